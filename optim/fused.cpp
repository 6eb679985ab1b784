#include "optim/fused.h"

#include <ATen/ops/_foreach_add.h>
#include <ATen/ops/_fused_adam.h>
#include <ATen/ops/_fused_adamw.h>
#include <ATen/ops/_fused_sgd.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros_like.h>
#include <ATen/core/grad_mode.h>

#include <map>
#include <optional>
#include <stdexcept>
#include <tuple>

namespace fabric::optim {
namespace {

// Index lists of the parameters sharing a device and dtype (one kernel call each).
using Key = std::tuple<int, int, int>;  // device type, device index, dtype
Key key_of(const at::Tensor& t) {
  return {static_cast<int>(t.device().type()), t.device().index(), static_cast<int>(t.scalar_type())};
}

void check_dense(const at::Tensor& grad, const char* optimizer) {
  if (grad.is_sparse()) {
    throw std::invalid_argument(std::string(optimizer) +
                                " does not support sparse gradients; use LibTorch's per-parameter "
                                "optimizer for sparse parameters");
  }
}

std::vector<at::Tensor> pick(const std::vector<at::Tensor>& all, const std::vector<size_t>& index) {
  std::vector<at::Tensor> out;
  out.reserve(index.size());
  for (size_t i : index) out.push_back(all[i]);
  return out;
}

// `t` on `device`, or nothing when `t` is undefined (the kernels' optional
// grad_scale and found_inf).
std::optional<at::Tensor> on(const at::Tensor& t, const at::Device& device) {
  if (!t.defined()) return std::nullopt;
  return t.to(device);
}

// The kernels skip only on a flag of exactly 1; a flag summed over devices may be
// 2 or more, so any nonzero value becomes 1.
at::Tensor as_skip_flag(const at::Tensor& found_inf) {
  if (!found_inf.defined()) return {};
  return found_inf.ne(0).to(at::kFloat);
}

bool skip_flag_set(const at::Tensor& flag) { return flag.defined() && flag.item<double>() != 0; }

// The Adam/AdamW step shared by both (their options and states are distinct
// types with the same fields); `decoupled` picks AdamW's weight decay. With a
// nonzero `found_inf` the kernels change nothing and the step counts go back.
// Returns whether the step was taken.
template <typename Options, typename State>
bool adam_step(torch::optim::Optimizer& optimizer,
               ska::flat_hash_map<void*, std::unique_ptr<torch::optim::OptimizerParamState>>& state,
               StepTensors& step_tensors, bool decoupled, const char* name,
               const at::Tensor& grad_scale = {}, const at::Tensor& found = {}) {
  const auto found_inf = as_skip_flag(found);
  std::vector<at::Tensor> stepped;
  for (auto& group : optimizer.param_groups()) {
    const auto& options = static_cast<const Options&>(group.options());
    std::vector<at::Tensor> params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs;
    std::vector<int64_t> steps;
    for (auto& p : group.params()) {
      if (!p.grad().defined()) continue;
      check_dense(p.grad(), name);
      auto& slot = state[p.unsafeGetTensorImpl()];
      if (!slot) {
        auto fresh = std::make_unique<State>();
        fresh->step(0);
        fresh->exp_avg(at::zeros_like(p, at::MemoryFormat::Preserve));
        fresh->exp_avg_sq(at::zeros_like(p, at::MemoryFormat::Preserve));
        if (options.amsgrad()) fresh->max_exp_avg_sq(at::zeros_like(p, at::MemoryFormat::Preserve));
        slot = std::move(fresh);
      }
      auto& s = static_cast<State&>(*slot);
      s.step(s.step() + 1);
      params.push_back(p);
      grads.push_back(p.grad());
      exp_avgs.push_back(s.exp_avg());
      exp_avg_sqs.push_back(s.exp_avg_sq());
      if (options.amsgrad()) max_exp_avg_sqs.push_back(s.max_exp_avg_sq());
      steps.push_back(s.step());
    }
    if (params.empty()) continue;
    stepped.insert(stepped.end(), params.begin(), params.end());
    const auto state_steps = step_tensors.get(params, steps);
    std::map<Key, std::vector<size_t>> buckets;
    for (size_t i = 0; i < params.size(); ++i) buckets[key_of(params[i])].push_back(i);
    const auto [beta1, beta2] = options.betas();
    for (const auto& [unused, index] : buckets) {
      const auto p = pick(params, index), g = pick(grads, index), m = pick(exp_avgs, index),
                 v = pick(exp_avg_sqs, index), s = pick(state_steps, index);
      const auto vmax = options.amsgrad() ? pick(max_exp_avg_sqs, index) : std::vector<at::Tensor>{};
      const auto device = p.front().device();
      if (decoupled) {
        at::_fused_adamw_(p, g, m, v, vmax, s, options.lr(), beta1, beta2, options.weight_decay(),
                          options.eps(), options.amsgrad(), /*maximize=*/false, on(grad_scale, device),
                          on(found_inf, device));
      } else {
        at::_fused_adam_(p, g, m, v, vmax, s, options.lr(), beta1, beta2, options.weight_decay(),
                         options.eps(), options.amsgrad(), /*maximize=*/false, on(grad_scale, device),
                         on(found_inf, device));
      }
    }
  }
  if (!skip_flag_set(found_inf)) return true;
  // Skipped: the steps counted above did not happen (a first step leaves no state,
  // as LibTorch's Adam, which is not called at all on such a step).
  for (const auto& p : stepped) {
    auto it = state.find(p.unsafeGetTensorImpl());
    auto& s = static_cast<State&>(*it->second);
    if (s.step() <= 1) {
      state.erase(it);
    } else {
      s.step(s.step() - 1);
    }
    step_tensors.forget(p);
  }
  return false;
}

template <typename Step>
at::Tensor with_closure(const torch::optim::Optimizer::LossClosure& closure, Step step) {
  at::Tensor loss;
  if (closure) {
    at::AutoGradMode enable(true);
    loss = closure();
  }
  at::NoGradGuard no_grad;
  step();
  return loss;
}

}  // namespace

std::vector<at::Tensor> StepTensors::get(const std::vector<at::Tensor>& params,
                                         const std::vector<int64_t>& steps) {
  std::vector<at::Tensor> out, increment;
  out.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    auto& entry = entries_[params[i].unsafeGetTensorImpl()];
    if (entry.tensor.defined() && entry.value + 1 == steps[i] &&
        entry.tensor.device() == params[i].device()) {
      increment.push_back(entry.tensor);  // one step on: add 1 below, in one kernel
    } else {
      entry.tensor = at::full({}, static_cast<double>(steps[i]),
                              at::TensorOptions().dtype(at::kFloat).device(params[i].device()));
    }
    entry.value = steps[i];
    out.push_back(entry.tensor);
  }
  if (!increment.empty()) at::_foreach_add_(increment, 1);
  return out;
}

void StepTensors::forget(const at::Tensor& param) { entries_.erase(param.unsafeGetTensorImpl()); }

at::Tensor FusedAdam::step(LossClosure closure) {
  return with_closure(closure, [&] {
    adam_step<torch::optim::AdamOptions, torch::optim::AdamParamState>(*this, state_, steps_,
                                                                       false, "FusedAdam");
  });
}

at::Tensor FusedAdamW::step(LossClosure closure) {
  return with_closure(closure, [&] {
    adam_step<torch::optim::AdamWOptions, torch::optim::AdamWParamState>(*this, state_, steps_,
                                                                         true, "FusedAdamW");
  });
}

bool FusedAdam::step_with_amp_scaling(const at::Tensor& grad_scale, const at::Tensor& found_inf) {
  at::NoGradGuard no_grad;
  return adam_step<torch::optim::AdamOptions, torch::optim::AdamParamState>(*this, state_, steps_, false,
                                                                     "FusedAdam", grad_scale, found_inf);
}

bool FusedAdamW::step_with_amp_scaling(const at::Tensor& grad_scale, const at::Tensor& found_inf) {
  at::NoGradGuard no_grad;
  return adam_step<torch::optim::AdamWOptions, torch::optim::AdamWParamState>(*this, state_, steps_, true,
                                                                       "FusedAdamW", grad_scale, found_inf);
}

at::Tensor FusedSGD::step(LossClosure closure) {
  return with_closure(closure, [&] { fused_step({}, {}); });
}

bool FusedSGD::step_with_amp_scaling(const at::Tensor& grad_scale, const at::Tensor& found_inf) {
  at::NoGradGuard no_grad;
  return fused_step(grad_scale, found_inf);
}

bool FusedSGD::fused_step(const at::Tensor& grad_scale, const at::Tensor& found) {
  const auto found_inf = as_skip_flag(found);
  // New buffers join the state only once the kernel has filled them.
  std::vector<std::pair<void*, at::Tensor>> started;
  for (auto& group : param_groups_) {
    const auto& options = static_cast<const torch::optim::SGDOptions&>(group.options());
    const bool momentum = options.momentum() != 0;
    // Parameters whose momentum buffer starts now (the kernel copies the
    // gradient in) are stepped apart from those that have one.
    std::map<std::pair<Key, bool>, std::vector<at::Tensor>> params, grads, buffers;
    for (auto& p : group.params()) {
      if (!p.grad().defined()) continue;
      check_dense(p.grad(), "FusedSGD");
      bool first = false;
      at::Tensor buffer;
      if (momentum) {
        const auto it = state_.find(p.unsafeGetTensorImpl());
        if (it == state_.end()) {
          buffer = at::empty_like(p, at::MemoryFormat::Preserve);
          started.emplace_back(p.unsafeGetTensorImpl(), buffer);
          first = true;
        } else {
          buffer = static_cast<torch::optim::SGDParamState&>(*it->second).momentum_buffer();
        }
      }
      const auto key = std::make_pair(key_of(p), first);
      params[key].push_back(p);
      grads[key].push_back(p.grad());
      if (momentum) buffers[key].push_back(buffer);
    }
    for (auto& [key, list] : params) {
      const auto device = list.front().device();
      at::_fused_sgd_(list, grads[key], momentum ? buffers[key] : std::vector<at::Tensor>{},
                      options.weight_decay(), options.momentum(), options.lr(), options.dampening(),
                      options.nesterov(), /*maximize=*/false, /*is_first_step=*/key.second,
                      on(grad_scale, device), on(found_inf, device));
    }
  }
  if (skip_flag_set(found_inf)) return false;  // skipped: the kernels filled no new buffer
  for (auto& [impl, buffer] : started) {
    auto fresh = std::make_unique<torch::optim::SGDParamState>();
    fresh->momentum_buffer(buffer);
    state_[impl] = std::move(fresh);
  }
  return true;
}

}  // namespace fabric::optim
