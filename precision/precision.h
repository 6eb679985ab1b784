// The Precision interface: everything about numeric precision that Fabric applies
// around a user's module and optimizer. A plugin decides the dtype parameters are
// stored in, the scoped state forward runs under (autocast, default dtype), how
// inputs and outputs are cast, and how the loss is scaled and the step taken.
// Plugins know nothing about distribution or about Fabric itself.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>

namespace torch::nn {
class Module;
}
namespace torch::optim {
class Optimizer;
}

namespace fabric::precision {

class GradScaler;

// A scoped state (autocast, default dtype) held for as long as the object lives.
class Scope {
 public:
  virtual ~Scope() = default;
};
using ScopePtr = std::unique_ptr<Scope>;

using LossClosure = std::function<at::Tensor()>;

class Precision {
 public:
  virtual ~Precision() = default;

  // The canonical name, e.g. "bf16-mixed".
  virtual std::string name() const = 0;
  // The dtype the module's floating-point parameters and buffers are kept in.
  virtual c10::ScalarType param_dtype() const { return c10::ScalarType::Float; }
  // The dtype forward's arithmetic runs in: autocast's under "-mixed", else the
  // parameters'. A sharding strategy reduces gradients in it by default.
  virtual c10::ScalarType compute_dtype() const { return param_dtype(); }

  // Casts the module's floating-point parameters and buffers to param_dtype()
  // (integer buffers, such as BatchNorm's counter, are left alone).
  virtual void convert_module(torch::nn::Module& module) const;
  // Held while the user's module is constructed (Fabric::init_module).
  virtual ScopePtr module_init_context() const { return nullptr; }
  // Held around every forward of a set-up module and by Fabric::autocast().
  virtual ScopePtr forward_context() const { return nullptr; }
  // Applied to each tensor argument of forward and to each tensor it returns.
  virtual at::Tensor convert_input(const at::Tensor& input) const { return input; }
  virtual at::Tensor convert_output(const at::Tensor& output) const { return output; }

  // Returns the tensor backward should start from (the scaled loss for fp16 AMP).
  virtual at::Tensor pre_backward(const at::Tensor& loss) { return loss; }
  // Brings the optimizer's gradients to their true magnitude (no-op without scaling).
  virtual void unscale_gradients(torch::optim::Optimizer& /*optimizer*/) {}
  // Takes the optimizer step (skipped on inf/nan gradients under loss scaling).
  virtual at::Tensor optimizer_step(torch::optim::Optimizer& optimizer,
                                    const LossClosure& closure);
  // The loss scaler, or nullptr when this precision does not scale the loss.
  virtual GradScaler* scaler() { return nullptr; }
};

// Casts every floating-point parameter and buffer of `module` (recursively) to
// `dtype`, in place, keeping the tensors' identity so optimizers stay valid.
void cast_floating_point(torch::nn::Module& module, c10::ScalarType dtype);

// Casts a floating-point tensor to `dtype`; returns other tensors unchanged.
at::Tensor cast_if_floating(const at::Tensor& tensor, c10::ScalarType dtype);

}  // namespace fabric::precision
