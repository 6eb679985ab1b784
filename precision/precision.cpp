#include "precision/precision.h"

#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>

namespace fabric::precision {

void cast_floating_point(torch::nn::Module& module, c10::ScalarType dtype) {
  torch::NoGradGuard no_grad;
  for (auto& param : module.parameters(/*recurse=*/true)) {
    if (param.is_floating_point() && param.scalar_type() != dtype) {
      param.set_data(param.to(dtype));
      if (param.grad().defined()) param.mutable_grad() = param.grad().to(dtype);
    }
  }
  for (auto& buffer : module.buffers(/*recurse=*/true)) {
    if (buffer.is_floating_point() && buffer.scalar_type() != dtype) {
      buffer.set_data(buffer.to(dtype));
    }
  }
}

at::Tensor cast_if_floating(const at::Tensor& tensor, c10::ScalarType dtype) {
  if (tensor.defined() && tensor.is_floating_point() && tensor.scalar_type() != dtype) {
    return tensor.to(dtype);
  }
  return tensor;
}

void Precision::convert_module(torch::nn::Module& module) const {
  cast_floating_point(module, param_dtype());
}

at::Tensor Precision::optimizer_step(torch::optim::Optimizer& optimizer,
                                     const LossClosure& closure) {
  return optimizer.step(closure);
}

}  // namespace fabric::precision
