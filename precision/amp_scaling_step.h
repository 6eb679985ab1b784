// An optimizer whose step unscales the gradients and skips itself on inf/nan
// inside its own kernels (what Python's optimizers flag with
// `_step_supports_amp_scaling`, e.g. torch.optim.Adam(fused=True)). For such an
// optimizer GradScaler only checks the gradients for inf/nan and hands the scale
// and the flag to the step, instead of first unscaling every gradient in a pass of
// its own. fabric::optim::FusedAdam, FusedAdamW and FusedSGD implement it.
#pragma once

#include <ATen/core/Tensor.h>

namespace fabric::precision {

class AmpScalingStep {
 public:
  virtual ~AmpScalingStep() = default;
  // One optimizer step on gradients that are still multiplied by `grad_scale`
  // (float, one element), or already unscaled when `grad_scale` is undefined.
  // When `found_inf` (float, one element) is nonzero nothing changes: parameters,
  // optimizer state and step counts stay as they were. The gradients hold their
  // unscaled values afterwards, as after GradScaler::unscale_.
  virtual void step_with_amp_scaling(const at::Tensor& grad_scale, const at::Tensor& found_inf) = 0;
};

}  // namespace fabric::precision
