// An optimizer whose step unscales the gradients and skips itself on inf/nan
// inside its own kernels (what Python's optimizers flag with
// `_step_supports_amp_scaling`, e.g. torch.optim.Adam(fused=True)). For such an
// optimizer GradScaler only checks the gradients for inf/nan and hands the scale
// and the flag to the step, instead of unscaling them itself: the same arithmetic
// as Python's GradScaler with a fused optimizer (the kernel divides by the scale).
// Not a speed-up: the check still passes over every gradient (measured in
// docs/benchmarks.md). fabric::optim::FusedAdam, FusedAdamW and FusedSGD implement it.
#pragma once

#include <ATen/core/Tensor.h>

namespace fabric::precision {

class AmpScalingStep {
 public:
  virtual ~AmpScalingStep() = default;
  // One optimizer step on gradients that are still multiplied by `grad_scale`
  // (float, one element), or already unscaled when `grad_scale` is undefined.
  // When `found_inf` (float, one element) is nonzero nothing changes: parameters,
  // optimizer state, step counts and the gradients (still scaled) stay as they
  // were. After a step taken the gradients hold their unscaled values, as after
  // GradScaler::unscale_. Returns whether the step was taken (one host read of
  // the flag: LibTorch's step counts are host integers a skip must put back).
  virtual bool step_with_amp_scaling(const at::Tensor& grad_scale, const at::Tensor& found_inf) = 0;
};

}  // namespace fabric::precision
