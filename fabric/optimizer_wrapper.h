// FabricOptimizer: what Fabric::setup returns for an optimizer. step() goes through
// the strategy and its precision plugin (unscale, inf/nan check, skip, scale
// update under "16-mixed"); everything else reaches the wrapped
// torch::optim::Optimizer.
#pragma once

#include <functional>
#include <memory>

#include <ATen/core/Tensor.h>

namespace torch::optim {
class Optimizer;
}
namespace fabric::strategies {
class Strategy;
}

namespace fabric {

class FabricOptimizer {
 public:
  FabricOptimizer(std::shared_ptr<torch::optim::Optimizer> optimizer,
                  std::shared_ptr<strategies::Strategy> strategy);

  // Takes the step; with loss scaling it may be skipped (see
  // fabric.precision().scaler()->last_step_skipped()). Returns the closure's loss,
  // or an undefined tensor without a closure.
  at::Tensor step(std::function<at::Tensor()> closure = nullptr);
  void zero_grad(bool set_to_none = true);

  const std::shared_ptr<torch::optim::Optimizer>& optimizer() const { return optimizer_; }
  torch::optim::Optimizer* operator->() const { return optimizer_.get(); }

 private:
  std::shared_ptr<torch::optim::Optimizer> optimizer_;
  std::shared_ptr<strategies::Strategy> strategy_;
};

}  // namespace fabric
