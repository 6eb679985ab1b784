#include "precision/mixed_precision.h"

#include <stdexcept>

#include <torch/optim/optimizer.h>

#include "precision/scopes.h"

namespace fabric::precision {

MixedPrecision::MixedPrecision(c10::ScalarType dtype, c10::DeviceType device_type,
                               std::unique_ptr<GradScaler> scaler)
    : dtype_(dtype), device_type_(device_type), scaler_(std::move(scaler)) {
  if (dtype != c10::ScalarType::Half && dtype != c10::ScalarType::BFloat16) {
    throw std::invalid_argument(std::string("MixedPrecision: unsupported autocast dtype ") +
                                c10::toString(dtype) + "; valid dtypes are Half, BFloat16");
  }
}

std::string MixedPrecision::name() const {
  return dtype_ == c10::ScalarType::Half ? "16-mixed" : "bf16-mixed";
}

ScopePtr MixedPrecision::forward_context() const {
  return std::make_unique<AutocastScope>(device_type_, dtype_);
}

at::Tensor MixedPrecision::convert_input(const at::Tensor& input) const {
  return cast_if_floating(input, dtype_);
}

at::Tensor MixedPrecision::convert_output(const at::Tensor& output) const {
  return cast_if_floating(output, c10::ScalarType::Float);
}

at::Tensor MixedPrecision::pre_backward(const at::Tensor& loss) {
  return scaler_ ? scaler_->scale(loss) : loss;
}

void MixedPrecision::unscale_gradients(torch::optim::Optimizer& optimizer) {
  if (scaler_) scaler_->unscale_(optimizer);
}

at::Tensor MixedPrecision::optimizer_step(torch::optim::Optimizer& optimizer,
                                          const LossClosure& closure) {
  if (!scaler_) return optimizer.step(closure);
  if (closure) {
    throw std::invalid_argument(
        "precision '16-mixed' with loss scaling does not support optimizer closures "
        "(the closure's backward would run on an unscaled loss); call fabric.backward(loss) "
        "and then optimizer.step() without a closure");
  }
  scaler_->step(optimizer);
  scaler_->update();
  return {};
}

}  // namespace fabric::precision
