#include "launchers/cluster_environment.h"

#include <algorithm>
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

void read_main(ClusterEnvironment& env) {
  if (const char* addr = get("MASTER_ADDR")) env.main_address = addr;
  const int64_t port = read_int("MASTER_PORT", env.main_port);
  if (port > 65535) {
    throw std::invalid_argument("environment variable MASTER_PORT=" + std::to_string(port) +
                                " is not a TCP port (1..65535)");
  }
  env.main_port = static_cast<int>(port);
}

// "node[1-3,5],other" -> "node1"; "a,b" -> "a".
std::string first_host(const std::string& list) {
  std::string host;
  for (char c : list) {
    if (c == ',') break;
    if (c == '[') {
      size_t open = list.find('[');
      std::string inside = list.substr(open + 1);
      size_t end = inside.find_first_of("-,]");
      return host + inside.substr(0, end);
    }
    host += c;
  }
  return host;
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
    env.local_world_size = read_int("LOCAL_WORLD_SIZE", env.world_size);
    check(env, "RANK", "WORLD_SIZE");
    read_main(env);
    return env;
  }
  if (get("OMPI_COMM_WORLD_SIZE")) {
    env.kind = "mpi";
    env.global_rank = read_int("OMPI_COMM_WORLD_RANK", 0);
    env.world_size = read_int("OMPI_COMM_WORLD_SIZE", 1);
    env.local_rank = read_int("OMPI_COMM_WORLD_LOCAL_RANK", 0);
    env.node_rank = read_int("OMPI_COMM_WORLD_NODE_RANK", 0);
    env.local_world_size = read_int("OMPI_COMM_WORLD_LOCAL_SIZE", env.world_size);
    check(env, "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE");
    read_main(env);
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
    const int64_t nodes = std::max<int64_t>(1, read_int("SLURM_NNODES", 1));
    env.local_world_size = std::max<int64_t>(1, env.world_size / nodes);
    check(env, "SLURM_PROCID", "SLURM_NTASKS");
    if (const char* list = get("SLURM_NODELIST")) env.main_address = first_host(list);
    if (const char* job = get("SLURM_JOB_ID")) {
      std::string id = job;
      if (id.size() > 4) id = id.substr(id.size() - 4);
      env.main_port = 15000 + std::atoi(id.c_str());
    }
    read_main(env);
    return env;
  }
  return env;
}

}  // namespace fabric::launchers
