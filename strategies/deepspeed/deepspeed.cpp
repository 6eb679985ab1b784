// The deepspeed names, the config file and stage 3 (FSDP under these names).
#include "strategies/deepspeed/deepspeed.h"

#include <cstdlib>
#include <iostream>
#include <stdexcept>

#include "strategies/deepspeed/config.h"
#include "util/quoted_list.h"

namespace fabric::strategies {

const std::vector<DeepSpeedName>& deepspeed_names() {
  static const std::vector<DeepSpeedName> names = {
      {"deepspeed", 2, false, "DeepSpeed ZeRO stage 2 (torchfabric's implementation): gradients and optimizer state partitioned"},
      {"deepspeed_stage_1", 1, false, "ZeRO stage 1: optimizer state (and fp32 masters) partitioned"},
      {"deepspeed_stage_1_offload", 1, true, "ZeRO stage 1, fp32 masters and optimizer state in host memory"},
      {"deepspeed_stage_2", 2, false, "ZeRO stage 2: gradients and optimizer state partitioned"},
      {"deepspeed_stage_2_offload", 2, true, "ZeRO stage 2, fp32 masters and optimizer state in host memory"},
      {"deepspeed_stage_3", 3, false, "ZeRO stage 3: parameters too (fsdp FULL_SHARD)"},
      {"deepspeed_stage_3_offload", 3, true, "ZeRO stage 3, optimizer state and parameters in host memory"},
      {"deepspeed_stage_3_offload_nvme", 3, true, "not supported (NVMe offload): refused with the alternatives"},
  };
  return names;
}

std::shared_ptr<Strategy> make_deepspeed_strategy(const std::string& name, Topology topology,
                                                  ProcessGroupOptions process_group,
                                                  DeepSpeedOptions options) {
  const DeepSpeedName* entry = nullptr;
  for (const auto& n : deepspeed_names()) {
    if (name == n.name) entry = &n;
  }
  if (!entry) {
    std::vector<std::string> valid;
    for (const auto& n : deepspeed_names()) valid.push_back(n.name);
    throw std::invalid_argument(unsupported_value("strategy", name, valid));
  }
  if (name == "deepspeed_stage_3_offload_nvme") {
    throw std::invalid_argument(
        "strategy='deepspeed_stage_3_offload_nvme' is not supported: torchfabric offloads to host "
        "memory only, not to NVMe. Use 'deepspeed_stage_3_offload' (host memory) or "
        "'deepspeed_stage_3'");
  }
  // The name sets the stage and offload, unless it is plain "deepspeed", whose
  // options (and config) decide.
  const bool by_name = name != "deepspeed";
  if (by_name) {
    options.stage = entry->stage;
    if (entry->offload) {
      options.offload_optimizer = true;
      if (entry->stage == 3) options.offload_parameters = true;
    }
  }
  std::string config = options.config;
  if (config.empty()) {
    if (const char* env = std::getenv("PL_DEEPSPEED_CONFIG_PATH"); env && *env) config = env;
  }
  ZeRODataParallel::ConfigPrecision precision;
  if (!config.empty()) {
    const int named_stage = options.stage;
    auto read = apply_deepspeed_config(config, topology.world_size, options);
    if (by_name && options.stage != named_stage) {
      throw std::invalid_argument("strategy='" + name + "' is ZeRO stage " + std::to_string(named_stage) +
                                  ", but the deepspeed config '" + config + "' has zero_optimization.stage = " +
                                  std::to_string(options.stage) +
                                  "; use strategy='deepspeed' to take the stage from the config, or make them agree");
    }
    precision.fp16 = read.fp16;
    precision.bf16 = read.bf16;
    if (!read.ignored.empty() && topology.global_rank == 0) {
      std::cerr << "torchfabric: warning: the deepspeed config '" << config
                << "' has keys torchfabric does not read (no effect on the training): "
                << quoted_list(read.ignored) << std::endl;
    }
  }
  if (options.stage < 1 || options.stage > 3) {
    throw std::invalid_argument("deepspeed: stage=" + std::to_string(options.stage) +
                                " is not supported. Valid values: 1, 2, 3");
  }
  if (options.state_dict_type != "full" && options.state_dict_type != "sharded") {
    throw std::invalid_argument(name + ": " + unsupported_value("state_dict_type", options.state_dict_type,
                                                                {"full", "sharded"}));
  }
  if (options.state_dict_type == "sharded" && options.stage != 3) {
    throw std::invalid_argument(
        name + ": state_dict_type='sharded' is implemented for ZeRO stage 3 (deepspeed_stage_3); "
        "stages 1 and 2 write the full file DDP writes (state_dict_type='full'), and load sharded "
        "(DCP) checkpoints from any strategy");
  }
  if (options.stage == 3) {
    FSDPOptions fsdp;
    fsdp.sharding_strategy = "FULL_SHARD";
    fsdp.state_dict_type = options.state_dict_type;
    return std::make_shared<DeepSpeedStage3>(name, std::move(topology), std::move(process_group), options,
                                             fsdp, precision);
  }
  return std::make_shared<ZeRODataParallel>(name, std::move(topology), std::move(process_group), options,
                                            precision);
}

DeepSpeedStage3::DeepSpeedStage3(std::string name, Topology topology, ProcessGroupOptions process_group,
                                 DeepSpeedOptions options, FSDPOptions fsdp,
                                 ZeRODataParallel::ConfigPrecision config_precision)
    : FSDPStrategy(std::move(topology), std::move(process_group), std::move(fsdp)),
      deepspeed_(std::move(options)),
      config_precision_(config_precision) {
  name_ = std::move(name);
  if (deepspeed_.offload_optimizer || deepspeed_.offload_parameters) {
    throw std::invalid_argument(
        name_ + ": offloading at ZeRO stage 3 is not implemented in torchfabric yet. Use "
        "'deepspeed_stage_3' (everything sharded on the device) or 'deepspeed_stage_2_offload' "
        "(fp32 masters and optimizer state in host memory)");
  }
}

void DeepSpeedStage3::set_precision(std::shared_ptr<precision::Precision> plugin) {
  // The scaler's options first: FSDP installs its found-inf reducer on it.
  apply_deepspeed_precision(name_, deepspeed_, config_precision_, *plugin);
  FSDPStrategy::set_precision(std::move(plugin));
}

at::Tensor DeepSpeedStage3::optimizer_step(torch::optim::Optimizer& optimizer,
                                           const precision::LossClosure& closure) {
  if (deepspeed_.gradient_clipping > 0) {
    clip_gradients_norm(nullptr, optimizer, deepspeed_.gradient_clipping, 2.0, false);
  }
  return FSDPStrategy::optimizer_step(optimizer, closure);
}

}  // namespace fabric::strategies
