#include "fabric/optimizer_wrapper.h"

#include <torch/optim/optimizer.h>

#include "strategies/strategy.h"

namespace fabric {

FabricOptimizer::FabricOptimizer(std::shared_ptr<torch::optim::Optimizer> optimizer,
                                 std::shared_ptr<strategies::Strategy> strategy)
    : optimizer_(std::move(optimizer)), strategy_(std::move(strategy)) {}

at::Tensor FabricOptimizer::step(std::function<at::Tensor()> closure) {
  return strategy_->optimizer_step(*optimizer_, closure);
}

void FabricOptimizer::zero_grad(bool set_to_none) { optimizer_->zero_grad(set_to_none); }

}  // namespace fabric
