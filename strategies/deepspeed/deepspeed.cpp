// The deepspeed names, the config file and stage 3 (FSDP under these names).
#include "strategies/deepspeed/deepspeed.h"

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <stdexcept>

#include <ATen/ops/empty.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/optim/optimizer.h>

#include "optim/codec.h"
#include "strategies/deepspeed/config.h"
#include "strategies/deepspeed/zero.h"
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
      {"deepspeed_stage_3_offload", 3, true, "ZeRO stage 3, fp32 masters and optimizer state in host memory"},
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
    // (_offload is the optimizer's offload; parameter pieces at stage 3 stay on
    // the device unless offload_parameters asks, which only the CPU can do.)
    if (entry->offload) options.offload_optimizer = true;
  }
  std::string config = options.config;
  if (config.empty()) {
    if (const char* env = std::getenv("PL_DEEPSPEED_CONFIG_PATH"); env && *env) config = env;
  }
  ZeRODataParallel::FromConfig from_config;
  if (!config.empty()) {
    const int named_stage = options.stage;
    auto read = apply_deepspeed_config(config, topology.world_size, options);
    if (by_name && options.stage != named_stage) {
      throw std::invalid_argument("strategy='" + name + "' is ZeRO stage " + std::to_string(named_stage) +
                                  ", but the deepspeed config '" + config + "' has zero_optimization.stage = " +
                                  std::to_string(options.stage) +
                                  "; use strategy='deepspeed' to take the stage from the config, or make them agree");
    }
    from_config.fp16 = read.fp16;
    from_config.bf16 = read.bf16;
    if (!read.ignored.empty()) {
      from_config.warning = "the deepspeed config '" + config +
                          "' has keys torchfabric does not read (no effect on the training): " +
                          quoted_list(read.ignored);
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
  if (options.stage == 3) {
    FSDPOptions fsdp;
    fsdp.sharding_strategy = "FULL_SHARD";
    fsdp.state_dict_type = options.state_dict_type;
    return std::make_shared<DeepSpeedStage3>(name, std::move(topology), std::move(process_group), options,
                                             fsdp, from_config);
  }
  return std::make_shared<ZeRODataParallel>(name, std::move(topology), std::move(process_group), options,
                                            from_config);
}

DeepSpeedStage3::DeepSpeedStage3(std::string name, Topology topology, ProcessGroupOptions process_group,
                                 DeepSpeedOptions options, FSDPOptions fsdp,
                                 ZeRODataParallel::FromConfig from_config)
    : FSDPStrategy(std::move(topology), std::move(process_group), std::move(fsdp)),
      deepspeed_(std::move(options)),
      from_config_(from_config) {
  name_ = std::move(name);
  if (deepspeed_.offload_parameters && !root_device().is_cpu()) {
    throw std::invalid_argument(
        name_ + ": offload_parameters (offload_param.device=\"cpu\") is not implemented on CUDA: "
        "parameter pieces stay in device memory. Use offload_optimizer alone (fp32 masters and "
        "optimizer state in host memory), or 'deepspeed_stage_3'");
  }
}

void DeepSpeedStage3::setup_optimizer(torch::optim::Optimizer& optimizer) {
  FSDPStrategy::setup_optimizer(optimizer);
  if (masters_.count(&optimizer)) return;
  const bool offload = deepspeed_.offload_optimizer;
  const auto device = offload ? c10::Device(c10::kCPU) : root_device();
  const bool pin = offload && root_device().is_cuda();
  std::vector<Master> list;
  torch::NoGradGuard no_grad;
  for (auto& group : optimizer.param_groups()) {
    for (auto& p : group.params()) {
      if (!p.requires_grad() || (!offload && p.scalar_type() == at::kFloat)) continue;
      auto master = at::empty(p.sizes(), at::TensorOptions().dtype(at::kFloat).device(device).pinned_memory(pin));
      master.copy_(p);
      master.requires_grad_(true);
      list.push_back({p, master});
      p = master;
    }
  }
  if (!list.empty()) masters_[&optimizer] = std::move(list);
}

void DeepSpeedStage3::backward(const at::Tensor& loss) {
  FSDPStrategy::backward(loss);
  if (!gradient_sync()) return;  // full gradients stay with the parameters until the synced one
  torch::NoGradGuard no_grad;
  for (auto& [optimizer, list] : masters_) {
    for (auto& m : list) {
      const auto grad = m.param.grad();
      if (!grad.defined()) continue;
      if (m.master.grad().defined()) {
        m.master.mutable_grad().add_(grad.to(m.master.device()));
      } else {
        m.master.mutable_grad() = grad.to(m.master.options().requires_grad(false), false, true);
      }
      m.param.mutable_grad() = at::Tensor();
    }
  }
}

void warn_about_config(const ZeRODataParallel::FromConfig& from_config, int64_t global_rank) {
  if (!from_config.warning.empty() && global_rank == 0) {
    std::cerr << "torchfabric: warning: " << from_config.warning << std::endl;
  }
}

void DeepSpeedStage3::setup_environment() {
  FSDPStrategy::setup_environment();
  warn_about_config(from_config_, global_rank());
}

void DeepSpeedStage3::set_precision(std::shared_ptr<precision::Precision> plugin) {
  // The scaler's options first: FSDP installs its found-inf reducer on it.
  apply_deepspeed_precision(name_, deepspeed_, from_config_, *plugin);
  FSDPStrategy::set_precision(std::move(plugin));
}

at::Tensor DeepSpeedStage3::optimizer_step(torch::optim::Optimizer& optimizer,
                                           const precision::LossClosure& closure) {
  if (deepspeed_.gradient_clipping > 0) {
    clip_gradients_norm(nullptr, optimizer, deepspeed_.gradient_clipping, 2.0, false);
  }
  auto out = FSDPStrategy::optimizer_step(optimizer, closure);
  auto it = masters_.find(&optimizer);
  if (it != masters_.end()) {
    torch::NoGradGuard no_grad;
    for (auto& m : it->second) m.param.copy_(m.master);
  }
  return out;
}

// Around fsdp's own scope: the optimizer shows the module's parameters (fsdp
// gathers their state), its state on their device; on exit the masters and
// their state come back (after a load: the loaded values, the masters taken
// from the loaded parameters).
class DeepSpeedStage3::MasterScope : public precision::Scope {
 public:
  MasterScope(DeepSpeedStage3& strategy, const std::vector<torch::optim::Optimizer*>& optimizers, bool loading)
      : strategy_(strategy), loading_(loading) {
    torch::NoGradGuard no_grad;
    for (auto* optimizer : optimizers) {
      auto it = strategy_.masters_.find(optimizer);
      if (it == strategy_.masters_.end()) continue;
      std::unordered_map<const void*, const Master*> of;
      for (const auto& m : it->second) of[m.master.unsafeGetTensorImpl()] = &m;
      for (auto& group : optimizer->param_groups()) {
        for (auto& p : group.params()) {
          auto found = of.find(p.unsafeGetTensorImpl());
          if (found == of.end()) continue;
          swaps_.push_back({optimizer, &p, *found->second});
          move_state(*optimizer, found->second->master, found->second->param);
          p = found->second->param;
          if (loading_) continue;
          auto st = optimizer->state().find(p.unsafeGetTensorImpl());
          if (st == optimizer->state().end()) continue;
          for (auto* slot : optim::codec_for(optimizer->defaults()).per_element_state(*st->second)) {
            if (!slot->defined()) continue;
            saved_.push_back({slot, *slot});
            *slot = slot->to(p.device());
          }
        }
      }
    }
  }
  ~MasterScope() override {
    try {
      leave();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "torchfabric: %s: restoring the fp32 masters after a checkpoint failed: %s\n",
                   strategy_.name().c_str(), e.what());
    }
  }
  precision::ScopePtr inner;  // fsdp's scope, left before this one

 private:
  struct Swap {
    torch::optim::Optimizer* optimizer;
    at::Tensor* in_group;
    Master entry;
  };
  void leave() {
    inner.reset();
    torch::NoGradGuard no_grad;
    for (auto& [slot, value] : saved_) *slot = value;
    for (auto& swap : swaps_) {
      auto& m = swap.entry;
      if (loading_) {
        auto st = swap.optimizer->state().find(m.param.unsafeGetTensorImpl());
        if (st != swap.optimizer->state().end()) {
          for (auto* slot : optim::codec_for(swap.optimizer->defaults()).per_element_state(*st->second)) {
            if (slot->defined()) *slot = slot->to(m.master.options().requires_grad(false), false, true);
          }
        }
      }
      move_state(*swap.optimizer, m.param, m.master);
      *swap.in_group = m.master;
    }
    // After any load (a module alone too) every master starts from its piece.
    if (loading_) strategy_.refresh_masters();
  }
  DeepSpeedStage3& strategy_;
  bool loading_;
  std::vector<Swap> swaps_;
  std::vector<std::pair<at::Tensor*, at::Tensor>> saved_;
};

const DeepSpeedStage3::Master* DeepSpeedStage3::master_of(const at::Tensor& tensor) const {
  for (const auto& [optimizer, list] : masters_) {
    for (const auto& m : list) {
      if (m.master.is_same(tensor)) return &m;
    }
  }
  return nullptr;
}

std::optional<Strategy::ParameterShard> DeepSpeedStage3::parameter_shard(const at::Tensor& tensor) const {
  const auto* m = master_of(tensor);
  return FSDPStrategy::parameter_shard(m ? m->param : tensor);
}

at::Tensor DeepSpeedStage3::parameter_of(const at::Tensor& tensor) const {
  const auto* m = master_of(tensor);
  return m ? m->param : at::Tensor();
}

void DeepSpeedStage3::refresh_masters() {
  torch::NoGradGuard no_grad;
  for (auto& [optimizer, list] : masters_) {
    for (auto& m : list) m.master.copy_(m.param);
  }
}

precision::ScopePtr DeepSpeedStage3::sharded_state_context(const std::vector<torch::nn::Module*>& /*modules*/,
                                                           const std::vector<torch::optim::Optimizer*>& /*optimizers*/,
                                                           bool loading) {
  if (!loading || masters_.empty()) return nullptr;
  return std::make_unique<CallOnExit>([this] { refresh_masters(); });
}

precision::ScopePtr DeepSpeedStage3::full_state_context(const std::vector<torch::nn::Module*>& modules,
                                                        const std::vector<torch::optim::Optimizer*>& optimizers,
                                                        bool loading) {
  if (masters_.empty()) return FSDPStrategy::full_state_context(modules, optimizers, loading);
  auto scope = std::make_unique<MasterScope>(*this, optimizers, loading);
  scope->inner = FSDPStrategy::full_state_context(modules, optimizers, loading);
  return scope;
}

}  // namespace fabric::strategies
