#include "strategies/registry.h"

#include <stdexcept>

#include "util/quoted_list.h"
#include "strategies/ddp.h"
#include "strategies/fsdp.h"
#include "strategies/single_device.h"

namespace fabric::strategies {

std::vector<std::string> valid_strategies() { return {"auto", "single_device", "ddp", "fsdp"}; }

std::string resolve_strategy_name(const std::string& name, int64_t world_size) {
  bool known = false;
  for (const auto& valid : valid_strategies()) known = known || valid == name;
  if (!known) {
    throw std::invalid_argument("strategy='" + name + "' is not supported. Valid values: " +
                                quoted_list(valid_strategies()));
  }
  if (name == "auto") return world_size > 1 ? "ddp" : "single_device";
  if (name == "single_device" && world_size > 1) {
    throw std::invalid_argument(
        "strategy='single_device' runs one process on one device, but devices x num_nodes "
        "make a world of " + std::to_string(world_size) +
        " processes; use strategy='ddp' (or 'auto'), or devices=1");
  }
  return name;
}

namespace {

// The process-group part of the args, shared by the multi-process strategies.
ProcessGroupOptions process_group_options(const StrategyArgs& args) {
  ProcessGroupOptions pg;
  pg.backend = args.process_group_backend;
  pg.master_addr = args.main_address;
  pg.master_port = args.main_port;
  pg.timeout = args.timeout;
  return pg;
}

}  // namespace

std::shared_ptr<Strategy> make_strategy(const std::string& name, const StrategyArgs& args) {
  const auto& devices = args.topology.parallel_devices;
  if (name == "single_device") {
    if (devices.size() != 1) {
      throw std::invalid_argument("strategy='single_device' needs exactly one device, got " +
                                  std::to_string(devices.size()));
    }
    return std::make_shared<SingleDeviceStrategy>(devices.front());
  }
  if (name == "ddp") {
    return std::make_shared<DDPStrategy>(args.topology, process_group_options(args), args.ddp);
  }
  if (name == "fsdp") {
    return std::make_shared<FSDPStrategy>(args.topology, process_group_options(args), args.fsdp);
  }
  throw std::invalid_argument("strategy='" + name + "' is not supported. Valid values: " +
                              quoted_list(valid_strategies()));
}

}  // namespace fabric::strategies
