// Turns a strategy name into a Strategy, from one table (Lightning's
// StrategyRegistry): each strategy is one registration {name, factory,
// description}, and that table is where the valid values in errors and every
// CLI's --strategy help come from. The built-in ones are registered in
// registry.cpp; a program's own strategy is one file plus one line,
//   static const bool registered = fabric::strategies::register_strategy(
//       "mine", [](const fabric::strategies::StrategyArgs& a) { return std::make_shared<Mine>(a); },
//       "what it does");
// and is then chosen by name (FabricOptions::strategy = "mine", or LT_STRATEGY).
// A ready Strategy object goes into FabricOptions::strategy_plugin instead.
#pragma once

#include <chrono>
#include <functional>
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
  std::chrono::milliseconds collective_timeout = std::chrono::minutes(10);  // 0: off
  DDPOptions ddp;
  FSDPOptions fsdp;
  DeepSpeedOptions deepspeed;
  ModelParallelOptions model_parallel;
};
// (The precision plugin is not an argument: Fabric hands it to the built
// strategy through Strategy::set_precision.)

// Builds the strategy for this rank from what the connector resolved.
using StrategyFactory = std::function<std::shared_ptr<Strategy>(const StrategyArgs&)>;

// Adds `name` to the table. Throws std::invalid_argument for an empty name,
// "auto", or a name already registered (naming who has it). Returns true, so that
// a file can register while the program starts (see above).
bool register_strategy(const std::string& name, StrategyFactory factory,
                       const std::string& description = "");

struct StrategyInfo {
  std::string name;
  std::string description;
};
// "auto", then every registered strategy in registration order (built-ins first).
std::vector<StrategyInfo> registered_strategies();
// Names accepted by `strategy=`, "auto" first.
std::vector<std::string> valid_strategies();
// The names for a --strategy help line: "auto, single_device, ddp or fsdp".
std::string strategy_choices();
// Resolves "auto" (single_device for a world of one, else ddp); throws
// std::invalid_argument naming the bad value and the valid ones, or why the
// combination cannot run.
std::string resolve_strategy_name(const std::string& name, int64_t world_size);
std::shared_ptr<Strategy> make_strategy(const std::string& name, const StrategyArgs& args);

}  // namespace fabric::strategies
