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
  const FabricOptions options = apply_environment_overrides(raw);
  Connection c;
  if (options.num_nodes < 1) {
    throw std::invalid_argument("num_nodes=" + std::to_string(options.num_nodes) +
                                " is not valid: it must be >= 1");
  }
  c.accelerator = make_accelerator(options.accelerator);
  c.devices = c.accelerator->parse_devices(options.devices);
  c.num_nodes = options.num_nodes;
  c.environment = launchers::detect_cluster_environment();
  const int64_t world_size = static_cast<int64_t>(c.devices.size()) * c.num_nodes;
  if (c.environment.world_size != 1 && c.environment.world_size != world_size) {
    throw std::invalid_argument(
        "the " + c.environment.kind + " environment says the world has " +
        std::to_string(c.environment.world_size) + " processes, but devices=" +
        options.devices.str() + " x num_nodes=" + std::to_string(c.num_nodes) + " gives " +
        std::to_string(world_size));
  }
  c.strategy = strategies::resolve_strategy_name(options.strategy, world_size);
  if (options.precision_plugin) {
    c.precision = "plugin";
  } else {
    c.precision = precision::canonical_precision(options.precision.str());
  }
  return c;
}

}  // namespace fabric
