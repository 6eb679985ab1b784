#include "strategies/strategy.h"

#include <torch/nn/utils/clip_grad.h>

#include "precision/precision.h"

namespace fabric::strategies {

void Strategy::backward(const at::Tensor& loss, precision::Precision& precision) {
  precision.pre_backward(loss).backward();
}

double Strategy::clip_gradients_norm(const std::vector<at::Tensor>& parameters, double max_norm,
                                     double norm_type, bool error_if_nonfinite) {
  return torch::nn::utils::clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite);
}

void Strategy::clip_gradients_value(const std::vector<at::Tensor>& parameters, double clip_val) {
  torch::nn::utils::clip_grad_value_(parameters, clip_val);
}

}  // namespace fabric::strategies
