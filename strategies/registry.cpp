#include "strategies/registry.h"

#include <algorithm>
#include <mutex>
#include <stdexcept>

#include "util/quoted_list.h"
#include "strategies/ddp.h"
#include "strategies/deepspeed/deepspeed.h"
#include "strategies/fsdp/fsdp.h"
#include "strategies/model_parallel/model_parallel.h"
#include "strategies/single_device.h"

namespace fabric::strategies {
namespace {

// The process-group part of the args, shared by the multi-process strategies.
ProcessGroupOptions process_group_options(const StrategyArgs& args) {
  ProcessGroupOptions pg;
  pg.backend = args.process_group_backend;
  pg.master_addr = args.main_address;
  pg.master_port = args.main_port;
  pg.timeout = args.timeout;
  pg.collective_timeout = args.collective_timeout;
  return pg;
}

struct Entry {
  StrategyInfo info;
  StrategyFactory factory;
};

struct Table {
  std::mutex mutex;
  std::vector<Entry> entries;
};

// The built-in strategies, then whatever the program registers.
Table& table() {
  static Table* t = [] {
    auto* t = new Table;  // never destroyed: registrations may outlive static destruction
    t->entries.push_back(
        {{"single_device", "one process on one device; nothing to synchronise"},
         [](const StrategyArgs& args) -> std::shared_ptr<Strategy> {
           const auto& devices = args.topology.parallel_devices;
           if (devices.size() != 1) {
             throw std::invalid_argument("strategy='single_device' needs exactly one device, got " +
                                         std::to_string(devices.size()));
           }
           return std::make_shared<SingleDeviceStrategy>(devices.front());
         }});
    t->entries.push_back(
        {{"ddp", "data parallel: replicated model, gradients all-reduced in buckets during backward"},
         [](const StrategyArgs& args) -> std::shared_ptr<Strategy> {
           return std::make_shared<DDPStrategy>(args.topology, process_group_options(args), args.ddp);
         }});
    t->entries.push_back(
        {{"fsdp", "fully sharded data parallel: parameters, gradients and optimizer state sharded"},
         [](const StrategyArgs& args) -> std::shared_ptr<Strategy> {
           return std::make_shared<FSDPStrategy>(args.topology, process_group_options(args), args.fsdp);
         }});
    t->entries.push_back(
        {{"model_parallel",
          "tensor parallel (fabric::tp layers split over tensor_parallel_size ranks) x data "
          "parallel (fsdp or ddp over the rest)"},
         [](const StrategyArgs& args) -> std::shared_ptr<Strategy> {
           return std::make_shared<ModelParallelStrategy>(args.topology, process_group_options(args),
                                                          args.model_parallel, args.ddp, args.fsdp);
         }});
    // Lightning's DeepSpeed names, ours underneath (strategies/deepspeed/deepspeed.h).
    for (const auto& entry : deepspeed_names()) {
      const std::string name = entry.name;
      t->entries.push_back(
          {{name, entry.description}, [name](const StrategyArgs& args) -> std::shared_ptr<Strategy> {
             return make_deepspeed_strategy(name, args.topology, process_group_options(args), args.deepspeed);
           }});
    }
    return t;
  }();
  return *t;
}

}  // namespace

bool register_strategy(const std::string& name, StrategyFactory factory, const std::string& description) {
  if (name.empty() || name == "auto") {
    throw std::invalid_argument("register_strategy: '" + name +
                                "' cannot name a strategy (empty, or \"auto\", which Fabric resolves)");
  }
  if (!factory) throw std::invalid_argument("register_strategy('" + name + "'): the factory is empty");
  auto& t = table();
  std::lock_guard<std::mutex> lock(t.mutex);
  for (const auto& e : t.entries) {
    if (e.info.name == name) {
      throw std::invalid_argument("register_strategy: strategy '" + name + "' is already registered (" +
                                  e.info.description + "); choose another name");
    }
  }
  t.entries.push_back({{name, description}, std::move(factory)});
  return true;
}

std::vector<StrategyInfo> registered_strategies() {
  auto& t = table();
  std::lock_guard<std::mutex> lock(t.mutex);
  std::vector<StrategyInfo> out = {{"auto", "single_device for a world of one process, else ddp"}};
  for (const auto& e : t.entries) out.push_back(e.info);
  return out;
}

std::vector<std::string> valid_strategies() {
  std::vector<std::string> out;
  for (const auto& info : registered_strategies()) out.push_back(info.name);
  return out;
}

std::string strategy_choices() {
  const auto names = valid_strategies();
  std::string out;
  for (size_t i = 0; i < names.size(); ++i) {
    out += (i == 0 ? "" : i + 1 == names.size() ? " or " : ", ") + names[i];
  }
  return out;
}

std::string resolve_strategy_name(const std::string& name, int64_t world_size) {
  const auto valid = valid_strategies();
  if (std::find(valid.begin(), valid.end(), name) == valid.end()) {
    throw std::invalid_argument(unsupported_value("strategy", name, valid));
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

std::shared_ptr<Strategy> make_strategy(const std::string& name, const StrategyArgs& args) {
  StrategyFactory factory;
  {
    auto& t = table();
    std::lock_guard<std::mutex> lock(t.mutex);
    for (const auto& e : t.entries) {
      if (e.info.name == name) factory = e.factory;
    }
  }
  if (!factory) throw std::invalid_argument(unsupported_value("strategy", name, valid_strategies()));
  auto strategy = factory(args);
  if (!strategy) throw std::runtime_error("the factory of strategy '" + name + "' returned no strategy");
  return strategy;
}

}  // namespace fabric::strategies
