#include "launchers/cluster_environment.h"

#include <cstdlib>
#include <stdexcept>

namespace fabric::launchers {
namespace {

const char* get(const char* name) {
  const char* value = std::getenv(name);
  return (value && *value) ? value : nullptr;
}

int64_t read_int(const char* name, int64_t fallback) {
  const char* value = get(name);
  if (!value) return fallback;
  char* end = nullptr;
  long long parsed = std::strtoll(value, &end, 10);
  if (end == value || *end != '\0' || parsed < 0) {
    throw std::invalid_argument(std::string("environment variable ") + name + "='" + value +
                                "' is not a non-negative integer");
  }
  return parsed;
}

void check(const ClusterEnvironment& env, const char* rank_var, const char* size_var) {
  if (env.world_size < 1) {
    throw std::invalid_argument(std::string(size_var) + "=" + std::to_string(env.world_size) +
                                " must be >= 1");
  }
  if (env.global_rank >= env.world_size) {
    throw std::invalid_argument(std::string(rank_var) + "=" + std::to_string(env.global_rank) +
                                " is out of range for " + size_var + "=" +
                                std::to_string(env.world_size) + " (valid ranks 0.." +
                                std::to_string(env.world_size - 1) + ")");
  }
}

}  // namespace

ClusterEnvironment detect_cluster_environment() {
  ClusterEnvironment env;
  if (get("RANK") && get("WORLD_SIZE")) {
    env.kind = "torchrun";
    env.global_rank = read_int("RANK", 0);
    env.world_size = read_int("WORLD_SIZE", 1);
    env.local_rank = read_int("LOCAL_RANK", 0);
    env.node_rank = read_int("NODE_RANK", read_int("GROUP_RANK", 0));
    check(env, "RANK", "WORLD_SIZE");
    return env;
  }
  if (get("OMPI_COMM_WORLD_SIZE")) {
    env.kind = "mpi";
    env.global_rank = read_int("OMPI_COMM_WORLD_RANK", 0);
    env.world_size = read_int("OMPI_COMM_WORLD_SIZE", 1);
    env.local_rank = read_int("OMPI_COMM_WORLD_LOCAL_RANK", 0);
    env.node_rank = read_int("OMPI_COMM_WORLD_NODE_RANK", 0);
    check(env, "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE");
    return env;
  }
  const char* job_name = get("SLURM_JOB_NAME");
  const bool interactive = job_name && (std::string(job_name) == "bash" ||
                                        std::string(job_name) == "interactive");
  if (get("SLURM_NTASKS") && get("SLURM_PROCID") && !interactive) {
    env.kind = "slurm";
    env.global_rank = read_int("SLURM_PROCID", 0);
    env.world_size = read_int("SLURM_NTASKS", 1);
    env.local_rank = read_int("SLURM_LOCALID", 0);
    env.node_rank = read_int("SLURM_NODEID", 0);
    check(env, "SLURM_PROCID", "SLURM_NTASKS");
    return env;
  }
  return env;
}

}  // namespace fabric::launchers
