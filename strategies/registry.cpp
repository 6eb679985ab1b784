#include "strategies/registry.h"

#include <stdexcept>

#include "strategies/single_device.h"

namespace fabric::strategies {
namespace {

std::string join(const std::vector<std::string>& items) {
  std::string out;
  for (const auto& item : items) out += (out.empty() ? "" : ", ") + ("'" + item + "'");
  return out;
}

}  // namespace

std::vector<std::string> valid_strategies() { return {"auto", "single_device"}; }

std::string resolve_strategy_name(const std::string& name, int64_t world_size) {
  bool known = false;
  for (const auto& valid : valid_strategies()) known = known || valid == name;
  if (!known) {
    throw std::invalid_argument("strategy='" + name + "' is not supported. Valid values: " +
                                join(valid_strategies()));
  }
  if (world_size > 1) {
    throw std::invalid_argument(
        "a world of " + std::to_string(world_size) + " processes (devices x num_nodes) needs a "
        "multi-process strategy, and strategy='" + name + "' runs one process on one device; "
        "this build offers only " + join(valid_strategies()) +
        ", so use devices=1 and num_nodes=1");
  }
  return "single_device";
}

std::shared_ptr<Strategy> make_strategy(const std::string& name, const StrategyArgs& args) {
  if (name == "single_device") {
    if (args.parallel_devices.size() != 1) {
      throw std::invalid_argument("strategy='single_device' needs exactly one device, got " +
                                  std::to_string(args.parallel_devices.size()));
    }
    return std::make_shared<SingleDeviceStrategy>(args.parallel_devices.front());
  }
  throw std::invalid_argument("strategy='" + name + "' is not supported. Valid values: " +
                              join(valid_strategies()));
}

}  // namespace fabric::strategies
