// Turns a strategy name into a Strategy. Adding a strategy = one file plus one
// entry in registry.cpp.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <c10/core/Device.h>

#include "strategies/strategy.h"

namespace fabric::strategies {

// What a strategy is built from, resolved by Fabric's connector.
struct StrategyArgs {
  std::vector<c10::Device> parallel_devices;  // this node's devices, one per local rank
  int num_nodes = 1;
};

// Names accepted by `strategy=`, "auto" first.
std::vector<std::string> valid_strategies();
// Resolves "auto" for the given world; throws std::invalid_argument naming the bad
// value and the valid ones, or why the combination cannot run.
std::string resolve_strategy_name(const std::string& name, int64_t world_size);
std::shared_ptr<Strategy> make_strategy(const std::string& name, const StrategyArgs& args);

}  // namespace fabric::strategies
