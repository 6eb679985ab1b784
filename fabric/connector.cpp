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
  const auto& env = c.environment;
  const bool external = env.kind != "none";
  if (external && options.devices.kind() == Devices::Kind::kAuto) {
    options.devices = Devices(static_cast<int>(env.local_world_size));
  }
  if (external && options.num_nodes == 1 && env.local_world_size > 0 &&
      env.world_size > env.local_world_size) {
    options.num_nodes = static_cast<int>(env.world_size / env.local_world_size);
  }
  auto& t = c.topology;
  t.parallel_devices = c.accelerator->parse_devices(options.devices);
  t.num_nodes = options.num_nodes;
  t.world_size = static_cast<int64_t>(t.parallel_devices.size()) * t.num_nodes;
  if (external) {
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
  } else if (t.world_size > 1) {
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

}  // namespace fabric
