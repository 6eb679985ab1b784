#include "launchers/cluster_environment.h"

#include <algorithm>
#include <cstdlib>
#include <cctype>
#include <initializer_list>
#include <stdexcept>
#include <vector>

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

// "node[01-03,5],other" -> "node01"; "a,b" -> "a"; "r[1-2]-n[3-4]" -> "r1-n3".
std::string first_host(const std::string& list) {
  std::string host;
  for (size_t i = 0; i < list.size(); ++i) {
    const char c = list[i];
    if (c == ',') break;
    if (c == '[') {
      const size_t close = list.find(']', i);
      const std::string inside = list.substr(i + 1, close == std::string::npos ? std::string::npos : close - i - 1);
      host += inside.substr(0, inside.find_first_of("-,"));
      if (close == std::string::npos) break;
      i = close;
      continue;
    }
    host += c;
  }
  return host;
}

// SLURM's per-node task counts, "2(x3),1" -> {2, 2, 2, 1}.
std::vector<int64_t> tasks_per_node(const char* name, const std::string& spec) {
  std::vector<int64_t> out;
  size_t pos = 0;
  while (pos < spec.size()) {
    size_t end = spec.find(',', pos);
    if (end == std::string::npos) end = spec.size();
    const std::string item = spec.substr(pos, end - pos);
    // N or N(xR), nothing else
    const auto digits = [&](size_t& i, long long& value) {
      const size_t from = i;
      value = 0;
      while (i < item.size() && std::isdigit(static_cast<unsigned char>(item[i]))) {
        value = value * 10 + (item[i++] - '0');
        if (value > 1000000) return false;
      }
      return i > from;
    };
    long long count = 0, repeat = 1;
    size_t i = 0;
    bool ok = digits(i, count);
    if (ok && i < item.size()) {
      ok = item.compare(i, 2, "(x") == 0;
      i += 2;
      ok = ok && digits(i, repeat) && repeat >= 1 && i + 1 == item.size() && item[i] == ')';
    }
    if (!ok) {
      throw std::invalid_argument(std::string("environment variable ") + name + "='" + spec +
                                  "' is not SLURM's list of tasks per node (e.g. 2(x3),1)");
    }
    for (long long r = 0; r < repeat; ++r) out.push_back(count);
    pos = end + 1;
  }
  return out;
}

const char* first_of(std::initializer_list<const char*> names) {
  for (const char* name : names) {
    if (get(name)) return name;
  }
  return nullptr;
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
    env.num_nodes = std::max<int64_t>(1, env.world_size / std::max<int64_t>(1, env.local_world_size));
    read_main(env);
    return env;
  }
  const char* job_name = get("SLURM_JOB_NAME");
  const bool interactive = job_name && (std::string(job_name) == "bash" ||
                                        std::string(job_name) == "interactive");
  // A task of an srun step. The batch script itself also has SLURM_PROCID=0 and
  // SLURM_NTASKS, but no step id: a program run there directly is not one of
  // the job's tasks (it may start them, e.g. through fabric.launch() / mpirun).
  const bool srun_task = get("SLURM_PROCID") && first_of({"SLURM_STEP_ID", "SLURM_STEPID"});
  if (srun_task && !interactive) {
    env.kind = "slurm";
    const char* size_var = first_of({"SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"});
    if (!size_var) size_var = "SLURM_NTASKS";
    env.global_rank = read_int("SLURM_PROCID", 0);
    env.world_size = read_int(size_var, 1);
    env.local_rank = read_int("SLURM_LOCALID", 0);
    env.node_rank = read_int("SLURM_NODEID", 0);
    check(env, "SLURM_PROCID", size_var);
    const char* nodes_var = first_of({"SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES"});
    const int64_t nodes = std::max<int64_t>(1, nodes_var ? read_int(nodes_var, 1) : 1);
    env.num_nodes = nodes;
    env.local_world_size = std::max<int64_t>(1, env.world_size / nodes);
    if (const char* per_node = first_of({"SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"})) {
      const auto counts = tasks_per_node(per_node, get(per_node));
      const bool even = std::all_of(counts.begin(), counts.end(),
                                    [&](int64_t n) { return n == counts.front(); });
      if (!even) {
        throw std::invalid_argument(
            std::string("SLURM placed this step's tasks unevenly on its nodes (") + per_node + "=" +
            get(per_node) + "); every node must run the same number of ranks (Lightning's devices "
            "per node): ask for them with --ntasks-per-node=N instead of --ntasks");
      }
      if (!counts.empty() && counts.front() > 0) env.local_world_size = counts.front();
    }
    if (env.local_rank >= env.local_world_size) {
      throw std::invalid_argument("SLURM_LOCALID=" + std::to_string(env.local_rank) +
                                  " is out of range for " + std::to_string(env.local_world_size) +
                                  " task(s) per node");
    }
    if (const char* list = first_of({"SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"})) {
      env.main_address = first_host(get(list));
    }
    if (const char* job = get("SLURM_JOB_ID")) {
      std::string id = job;
      if (id.size() > 4) id = id.substr(id.size() - 4);
      env.main_port = 15000 + std::atoi(id.c_str());
    }
    // Open MPI's MPI_Init joins the step's PMIx namespace (srun --mpi=pmix).
    env.pmix = get("PMIX_RANK") != nullptr;
    read_main(env);
    return env;
  }
  return env;
}

}  // namespace fabric::launchers
