// Turns a strategy name into a Strategy. Adding a strategy = one file plus one
// entry in registry.cpp.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include <c10/core/Device.h>

#include "strategies/options.h"
#include "strategies/strategy.h"
#include "strategies/topology.h"

namespace fabric::strategies {

// What a strategy is built from, resolved by Fabric's connector.
struct StrategyArgs {
  Topology topology;
  std::string process_group_backend;  // empty: the device's default
  std::string main_address;           // empty: from the environment or broadcast
  int main_port = 0;
  std::chrono::milliseconds timeout = std::chrono::minutes(30);
  DDPOptions ddp;
  FSDPOptions fsdp;
};

// Names accepted by `strategy=`, "auto" first.
std::vector<std::string> valid_strategies();
// Resolves "auto" (single_device for a world of one, else ddp); throws
// std::invalid_argument naming the bad value and the valid ones, or why the
// combination cannot run.
std::string resolve_strategy_name(const std::string& name, int64_t world_size);
std::shared_ptr<Strategy> make_strategy(const std::string& name, const StrategyArgs& args);

}  // namespace fabric::strategies
