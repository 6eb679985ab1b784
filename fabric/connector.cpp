#include "fabric/connector.h"

#include <cctype>
#include <cstdlib>
#include <optional>
#include <stdexcept>

#include "precision/registry.h"
#include "strategies/registry.h"

namespace fabric {
namespace {

// Returns the environment value for `name` if set, checking it against the value in
// code (`current`) the way Lightning's _argument_from_env does.
std::optional<std::string> from_env(const std::string& name, const std::string& current,
                                    const std::string& default_value) {
  const std::string var = "LT_" + name;
  const char* value = std::getenv(var.c_str());
  if (!value || !*value) return std::nullopt;
  const bool cli = std::getenv("LT_CLI_USED") != nullptr;
  if (cli && current != default_value && current != value) {
    std::string lower;
    for (char c : name) lower += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    throw std::invalid_argument("the code sets " + lower + "=" + current +
                                " but the command line sets --" + lower + "=" + value + " (" +
                                var + "); remove one of the two");
  }
  return std::string(value);
}

}  // namespace

FabricOptions apply_environment_overrides(FabricOptions options) {
  if (auto v = from_env("ACCELERATOR", options.accelerator, "auto")) options.accelerator = *v;
  if (auto v = from_env("STRATEGY", options.strategy, "auto")) options.strategy = *v;
  if (auto v = from_env("DEVICES", options.devices.str(), "auto")) options.devices = Devices(*v);
  if (auto v = from_env("PRECISION", options.precision.str(), "32-true")) options.precision = *v;
  if (auto v = from_env("NUM_NODES", std::to_string(options.num_nodes), "1")) {
    try {
      size_t used = 0;
      options.num_nodes = std::stoi(*v, &used);
      if (used != v->size()) throw std::invalid_argument("trailing characters");
    } catch (const std::exception&) {
      throw std::invalid_argument("LT_NUM_NODES='" + *v + "' is not an integer");
    }
  }
  return options;
}

Connection connect(const FabricOptions& raw) {
  FabricOptions options = apply_environment_overrides(raw);
  Connection c;
  if (options.num_nodes < 1) {
    throw std::invalid_argument("num_nodes=" + std::to_string(options.num_nodes) +
                                " is not valid: it must be >= 1");
  }
  c.accelerator = make_accelerator(options.accelerator);
  c.environment = launchers::detect_cluster_environment();
  auto& env = c.environment;
  const bool external = env.kind != "none";
  auto& t = c.topology;
  if (env.kind == "slurm" && env.pmix && c.accelerator->device_type() == c10::DeviceType::CPU) {
    // CPU ranks under srun --mpi=pmix meet as under mpirun (process_group.h): on
    // loopback or at the addresses rank 0 sends over MPI, not at the node list's
    // first name, which need not resolve. MASTER_ADDR/MASTER_PORT still choose.
    const char* addr = std::getenv("MASTER_ADDR");
    const char* port = std::getenv("MASTER_PORT");
    env.main_address = addr ? addr : "";
    if (!port || !*port) env.main_port = 0;
  }
  // srun --ntasks-per-node=1 and devices=G: this task is its node's launcher.
  bool node_launcher = false;
  if (env.kind == "slurm" && env.local_world_size == 1 &&
      options.devices.kind() != Devices::Kind::kAuto) {
    const auto devices = c.accelerator->parse_devices(options.devices);
    if (devices.size() > 1) {
      if (c.accelerator->device_type() != c10::DeviceType::CUDA) {
        throw std::invalid_argument(
            "devices=" + options.devices.str() + " on the CPU under srun with one task per node: "
            "CPU ranks form one MPI world, which srun itself must start. Ask srun for one task per "
            "rank and PMIx: srun --ntasks-per-node=" + std::to_string(devices.size()) +
            " --mpi=pmix PROGRAM (devices='auto' then follows it), or run mpirun PROGRAM in the "
            "sbatch script");
      }
      if (options.num_nodes != 1 && options.num_nodes != env.num_nodes) {
        throw std::invalid_argument("the slurm environment says the step has " +
                                    std::to_string(env.num_nodes) + " node(s), but num_nodes=" +
                                    std::to_string(options.num_nodes));
      }
      if (env.world_size != env.num_nodes) {
        throw std::invalid_argument("SLURM placed " + std::to_string(env.world_size) + " tasks on " +
                                    std::to_string(env.num_nodes) + " node(s)");
      }
      node_launcher = true;
      t.parallel_devices = devices;
      t.num_nodes = static_cast<int>(env.num_nodes);
      t.world_size = static_cast<int64_t>(devices.size()) * t.num_nodes;
      t.node_rank = env.node_rank;
      t.local_rank = 0;
      t.global_rank = env.node_rank * static_cast<int64_t>(devices.size());
      c.needs_launch = true;
      c.node_launch.num_nodes = t.num_nodes;
      c.node_launch.node_rank = static_cast<int>(env.node_rank);
      if (t.num_nodes > 1) {
        c.node_launch.main_address = env.main_address;
        c.node_launch.main_port = env.main_port;
      } else {
        // One node: the ranks meet on loopback at a port launch() picks.
        env.main_address.clear();
        env.main_port = 0;
      }
      if (t.num_nodes > 1 && (env.main_address.empty() || env.main_port == 0)) {
        throw std::invalid_argument(
            "a " + std::to_string(t.num_nodes) + "-node job with one srun task per node needs the "
            "main node's address and port: SLURM_STEP_NODELIST and SLURM_JOB_ID are missing; set "
            "MASTER_ADDR and MASTER_PORT");
      }
    }
  }
  if (!node_launcher) {
    if (external && options.devices.kind() == Devices::Kind::kAuto) {
      options.devices = Devices(static_cast<int>(env.local_world_size));
    }
    if (external && options.num_nodes == 1 && env.local_world_size > 0 &&
        env.world_size > env.local_world_size) {
      options.num_nodes = static_cast<int>(env.world_size / env.local_world_size);
    }
    std::optional<std::vector<c10::Device>> own;
    if (external && c.accelerator->device_type() == c10::DeviceType::CUDA) {
      own = per_task_devices(options.devices, env.local_world_size,
                             c.accelerator->auto_device_count(), c10::DeviceType::CUDA);
    }
    t.parallel_devices = own ? *own : c.accelerator->parse_devices(options.devices);
    t.num_nodes = options.num_nodes;
    t.world_size = static_cast<int64_t>(t.parallel_devices.size()) * t.num_nodes;
  }
  if (external && !node_launcher) {
    if (env.world_size != t.world_size) {
      throw std::invalid_argument(
          "the " + env.kind + " environment says the world has " +
          std::to_string(env.world_size) + " processes, but devices=" + options.devices.str() +
          " x num_nodes=" + std::to_string(t.num_nodes) + " gives " +
          std::to_string(t.world_size));
    }
    if (env.local_rank >= static_cast<int64_t>(t.parallel_devices.size())) {
      throw std::invalid_argument("the " + env.kind + " environment gives local rank " +
                                  std::to_string(env.local_rank) + ", but devices=" +
                                  options.devices.str() + " has only " +
                                  std::to_string(t.parallel_devices.size()) + " device(s) per node");
    }
    t.global_rank = env.global_rank;
    t.local_rank = env.local_rank;
    t.node_rank = env.node_rank;
  } else if (!external && t.world_size > 1) {
    if (t.num_nodes > 1) {
      throw std::invalid_argument(
          "num_nodes=" + std::to_string(t.num_nodes) +
          " needs every node's ranks started by a launcher: run the program with fabric-run "
          "(--num-nodes --node-rank --main-address) on each node, or with mpirun / srun");
    }
    c.needs_launch = true;
  }
  if (options.max_restarts < 0) {
    throw std::invalid_argument("max_restarts=" + std::to_string(options.max_restarts) +
                                " is not supported. Valid values: 0 (no restarts) or more");
  }
  c.supervises_restarts = options.max_restarts > 0 && env.kind == "none";
  if (options.collective_timeout.count() < 0) {
    throw std::invalid_argument("collective_timeout=" + std::to_string(options.collective_timeout.count()) +
                                " s is not supported. Valid values: 0 (no stall detection) or more seconds");
  }
  if (options.strategy_plugin) {
    const auto& plugin = *options.strategy_plugin;
    if (options.strategy != "auto" && options.strategy != plugin.name()) {
      throw std::invalid_argument("strategy='" + options.strategy + "' and a strategy_plugin named '" +
                                  plugin.name() + "' were both given; leave strategy at 'auto'");
    }
    if (plugin.world_size() != t.world_size) {
      throw std::invalid_argument("strategy_plugin '" + plugin.name() + "' was built for a world of " +
                                  std::to_string(plugin.world_size()) + " process(es), but devices=" +
                                  options.devices.str() + " x num_nodes=" + std::to_string(t.num_nodes) +
                                  " give " + std::to_string(t.world_size));
    }
    c.strategy = plugin.name();
  } else {
    c.strategy = strategies::resolve_strategy_name(options.strategy, t.world_size);
  }
  if (options.precision_plugin) {
    c.precision = "plugin";
  } else {
    c.precision = precision::canonical_precision(options.precision.str());
  }
  return c;
}

std::optional<std::vector<c10::Device>> per_task_devices(const Devices& devices,
                                                         int64_t local_world_size,
                                                         int64_t visible, c10::DeviceType type) {
  if (visible >= local_world_size || devices.kind() == Devices::Kind::kList) return std::nullopt;
  if (devices.kind() == Devices::Kind::kCount && devices.count() != local_world_size &&
      devices.count() != -1) {
    return std::nullopt;  // parsed as usual: the count does not fit what is visible
  }
  const char* cvd = std::getenv("CUDA_VISIBLE_DEVICES");
  const std::string seen = cvd ? std::string(" (CUDA_VISIBLE_DEVICES=") + cvd + ")" : "";
  if (visible != 1) {
    throw std::invalid_argument(
        "this task sees " + std::to_string(visible) + " GPUs" + seen + ", but its node runs " +
        std::to_string(local_world_size) + " ranks: give each task one GPU (srun --gpus-per-task=1) "
        "or every task all of the node's GPUs (srun --gpus-per-node=" + std::to_string(local_world_size) +
        "), so that each rank's device is known");
  }
  return std::vector<c10::Device>(static_cast<size_t>(local_world_size), c10::Device(type, 0));
}

}  // namespace fabric
