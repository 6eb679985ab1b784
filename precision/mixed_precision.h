// "bf16-mixed" and "16-mixed": parameters stay float32, forward runs under
// LibTorch's autocast in the half type, outputs come back as float32. With a
// GradScaler ("16-mixed" on CUDA) the loss is scaled before backward and the step
// is unscaled, checked for inf/nan and skipped when any is found.
#pragma once

#include <memory>

#include "precision/grad_scaler.h"
#include "precision/precision.h"

namespace fabric::precision {

class MixedPrecision : public Precision {
 public:
  // dtype: Half or BFloat16; device_type: the device autocast is enabled for.
  // scaler: required semantics of "16-mixed" on CUDA; may be null for bf16.
  MixedPrecision(c10::ScalarType dtype, c10::DeviceType device_type,
                 std::unique_ptr<GradScaler> scaler = nullptr);

  std::string name() const override;
  c10::ScalarType compute_dtype() const override { return dtype_; }
  ScopePtr forward_context() const override;
  at::Tensor convert_input(const at::Tensor& input) const override;
  at::Tensor convert_output(const at::Tensor& output) const override;
  at::Tensor pre_backward(const at::Tensor& loss) override;
  void unscale_gradients(torch::optim::Optimizer& optimizer) override;
  at::Tensor optimizer_step(torch::optim::Optimizer& optimizer,
                            const LossClosure& closure) override;
  GradScaler* scaler() override { return scaler_.get(); }

  c10::ScalarType autocast_dtype() const { return dtype_; }
  c10::DeviceType device_type() const { return device_type_; }

 private:
  c10::ScalarType dtype_;
  c10::DeviceType device_type_;
  std::unique_ptr<GradScaler> scaler_;
};

}  // namespace fabric::precision
