// The state of LibTorch's default random generators (CPU and every CUDA device),
// for checkpoints: a run resumed with restore() draws the same numbers (dropout
// masks, random crops, randperm) as the run that saved it.
#pragma once

#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>

namespace fabric {

struct RngState {
  at::Tensor cpu;                 // uint8 state of the default CPU generator
  std::vector<at::Tensor> cuda;   // one per visible CUDA device

  // The generators' current state.
  static RngState capture();
  // Puts the generators back into this state.
  void restore() const;

  // {"torch": tensor, "torch.cuda": [tensor...]}, with the keys Lightning uses for
  // these generators (files with the old key "cuda" still load).
  c10::IValue to_ivalue() const;
  static RngState from_ivalue(const c10::IValue& value);
};

}  // namespace fabric
