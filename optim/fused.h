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
#pragma once

#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/sgd.h>

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

 private:
  struct Entry {
    at::Tensor tensor;
    int64_t value = 0;
  };
  std::unordered_map<const void*, Entry> entries_;
};

class FusedAdam : public torch::optim::Adam {
 public:
  using torch::optim::Adam::Adam;
  at::Tensor step(LossClosure closure = nullptr) override;

 private:
  StepTensors steps_;
};

class FusedAdamW : public torch::optim::AdamW {
 public:
  using torch::optim::AdamW::AdamW;
  at::Tensor step(LossClosure closure = nullptr) override;

 private:
  StepTensors steps_;
};

class FusedSGD : public torch::optim::SGD {
 public:
  using torch::optim::SGD::SGD;
  at::Tensor step(LossClosure closure = nullptr) override;
};

}  // namespace fabric::optim
