#include "strategies/strategy.h"

#include <exception>
#include <stdexcept>

#include <ATen/ops/full.h>
#include <torch/nn/module.h>
#include <torch/nn/utils/clip_grad.h>
#include <torch/optim/optimizer.h>

#include "precision/true_precision.h"

namespace fabric::strategies {

Strategy::Strategy() : precision_(std::make_shared<precision::TruePrecision>(c10::ScalarType::Float)) {}

void Strategy::set_precision(std::shared_ptr<precision::Precision> precision) {
  if (!precision) {
    throw std::invalid_argument(name() + ": set_precision was given a null precision plugin");
  }
  precision_ = std::move(precision);
}

const Topology& Strategy::topology() const {
  static const Topology one_process{};
  return one_process;
}

void Strategy::module_to_device(torch::nn::Module& module) { module.to(root_device()); }

std::vector<at::Tensor> optimizer_parameters(const torch::optim::Optimizer& optimizer) {
  std::vector<at::Tensor> params;
  for (const auto& group : optimizer.param_groups()) {
    for (const auto& param : group.params()) params.push_back(param);
  }
  return params;
}

void Strategy::setup_optimizer(torch::optim::Optimizer& optimizer) {
  const auto device = root_device();
  for (const auto& param : optimizer_parameters(optimizer)) {
    if (param.device() != device) {
      throw std::invalid_argument(
          "Fabric::setup: the optimizer holds a parameter on " + param.device().str() +
          " but this Fabric runs on " + device.str() +
          "; set up the module first (fabric.setup(model, optimizer) does it in order)");
    }
  }
}

at::Tensor Strategy::optimizer_step(torch::optim::Optimizer& optimizer,
                                    const precision::LossClosure& closure) {
  return precision_->optimizer_step(optimizer, closure);
}

void Strategy::backward(const at::Tensor& loss) { precision_->pre_backward(loss).backward(); }

double Strategy::clip_gradients_norm(torch::nn::Module* /*module*/,
                                     torch::optim::Optimizer& optimizer, double max_norm,
                                     double norm_type, bool error_if_nonfinite) {
  precision_->unscale_gradients(optimizer);
  return torch::nn::utils::clip_grad_norm_(optimizer_parameters(optimizer), max_norm, norm_type,
                                           error_if_nonfinite);
}

void Strategy::clip_gradients_value(torch::nn::Module* /*module*/,
                                    torch::optim::Optimizer& optimizer, double clip_val) {
  precision_->unscale_gradients(optimizer);
  torch::nn::utils::clip_grad_value_(optimizer_parameters(optimizer), clip_val);
}

double Strategy::all_reduce_value(double value, ReduceOp op) {
  if (world_size() <= 1) return value;
  auto t = at::full({1}, value, at::TensorOptions().dtype(at::kDouble).device(root_device()));
  all_reduce(t, op);
  return t.item<double>();
}

void Strategy::save_checkpoint(const std::string& path,
                               const std::function<void(const std::string&)>& write) {
  std::exception_ptr error;
  if (is_global_zero()) {
    try {
      write(path);
    } catch (...) {
      error = std::current_exception();
    }
  }
  // Everyone leaves together; a failed write on rank 0 fails every rank.
  const bool failed = all_reduce_value(error ? 1.0 : 0.0, ReduceOp::kMax) != 0;
  if (failed && !error) {
    throw std::runtime_error("Fabric::save: rank 0 failed to write " + path +
                             " (its error names the cause)");
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace fabric::strategies
