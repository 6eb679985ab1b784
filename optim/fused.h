// Adam, AdamW and SGD whose step() updates every parameter of a group with one
// multi-tensor ATen kernel (at::_fused_adam_, _fused_adamw_, _fused_sgd_: what
// torch.optim.Adam(fused=True) runs), instead of LibTorch's several small ops per
// parameter. They are LibTorch's optimizers otherwise: the same options
// (AdamOptions, AdamWOptions, SGDOptions) and per-parameter state (AdamParamState,
// SGDParamState), so checkpoints, Python's torch.load, FSDP's state shards and
// state_dict/load_state_dict work unchanged, and a FusedAdam may load what an
// Adam saved and the other way round.
//
//   auto optimizer = std::make_shared<fabric::optim::FusedAdam>(
//       model->parameters(), torch::optim::AdamOptions(1e-3).weight_decay(0.01));
//
// Parameters are grouped by device and dtype for the kernels (CPU and CUDA;
// float, double, half, bfloat16). Sparse gradients are an error. Options
// LibTorch's optimizers lack (maximize, capturable) are not offered.
//
// Under loss scaling ("16-mixed", or a MixedPrecision plugin with a GradScaler)
// they take the scale and the inf/nan flag into the kernel (precision::AmpScalingStep,
// as Python's fused optimizers do): GradScaler then only checks the gradients,
// the kernel divides them by the scale, and a step with inf/nan gradients changes
// nothing (parameters, state, step counts).
#pragma once

#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/sgd.h>

#include "precision/amp_scaling_step.h"

#include <unordered_map>
#include <vector>

namespace fabric::optim {

// The step of each parameter as the float tensor the kernels read, kept on the
// parameter's device between steps (re-made when a load changed the step).
class StepTensors {
 public:
  // Tensors holding `steps[i]` on `params[i]`'s device.
  std::vector<at::Tensor> get(const std::vector<at::Tensor>& params,
                              const std::vector<int64_t>& steps);
  // Drops `param`'s cached tensor (its step went back: a skipped step).
  void forget(const at::Tensor& param);

 private:
  struct Entry {
    at::Tensor tensor;
    int64_t value = 0;
  };
  std::unordered_map<const void*, Entry> entries_;
};

class FusedAdam : public torch::optim::Adam, public precision::AmpScalingStep {
 public:
  using torch::optim::Adam::Adam;
  at::Tensor step(LossClosure closure = nullptr) override;
  bool step_with_amp_scaling(const at::Tensor& grad_scale, const at::Tensor& found_inf) override;

 private:
  StepTensors steps_;
};

class FusedAdamW : public torch::optim::AdamW, public precision::AmpScalingStep {
 public:
  using torch::optim::AdamW::AdamW;
  at::Tensor step(LossClosure closure = nullptr) override;
  bool step_with_amp_scaling(const at::Tensor& grad_scale, const at::Tensor& found_inf) override;

 private:
  StepTensors steps_;
};

class FusedSGD : public torch::optim::SGD, public precision::AmpScalingStep {
 public:
  using torch::optim::SGD::SGD;
  at::Tensor step(LossClosure closure = nullptr) override;
  bool step_with_amp_scaling(const at::Tensor& grad_scale, const at::Tensor& found_inf) override;

 private:
  bool fused_step(const at::Tensor& grad_scale, const at::Tensor& found_inf);
};

}  // namespace fabric::optim
