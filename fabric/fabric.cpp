#include "fabric/fabric.h"

#include <cstdlib>
#include <stdexcept>

#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>
#include <torch/utils.h>

#include "precision/registry.h"
#include "strategies/registry.h"

namespace fabric {

Fabric::Fabric(FabricOptions options) : options_(std::move(options)) {
  Connection connection = connect(options_);
  accelerator_name_ = connection.accelerator->name();
  strategies::StrategyArgs args;
  args.parallel_devices = connection.devices;
  args.num_nodes = connection.num_nodes;
  strategy_ = strategies::make_strategy(connection.strategy, args);
  precision_ = options_.precision_plugin
                   ? options_.precision_plugin
                   : precision::make_precision(connection.precision,
                                               connection.accelerator->device_type());
}

Fabric::~Fabric() {
  for (auto& logger : options_.loggers) {
    try {
      logger->finalize();
    } catch (...) {
      // A destructor must not throw; the logger already flushed what it could.
    }
  }
}

void Fabric::launch() {
  if (launched_) {
    throw std::logic_error("Fabric::launch() was already called on this Fabric");
  }
  strategy_->setup_environment();
  launched_ = true;
}

void Fabric::check_module(const torch::nn::Module* module) const {
  if (!module) throw std::invalid_argument("Fabric::setup: the module is a null pointer");
}

void Fabric::place_module(torch::nn::Module& module) {
  precision_->convert_module(module);
  strategy_->setup_module(module);
}

FabricOptimizer Fabric::setup_optimizer(std::shared_ptr<torch::optim::Optimizer> optimizer) {
  if (!optimizer) throw std::invalid_argument("Fabric::setup: the optimizer is a null pointer");
  const auto device = this->device();
  for (const auto& group : optimizer->param_groups()) {
    for (const auto& param : group.params()) {
      if (param.device() != device) {
        throw std::invalid_argument(
            "Fabric::setup: the optimizer holds a parameter on " + param.device().str() +
            " but this Fabric runs on " + device.str() +
            "; set up the module first (fabric.setup(model, optimizer) does it in order)");
      }
    }
  }
  return FabricOptimizer(std::move(optimizer), precision_, strategy_);
}

void Fabric::backward(const at::Tensor& loss) {
  if (!loss.defined()) throw std::invalid_argument("Fabric::backward: the loss is undefined");
  strategy_->backward(loss, *precision_);
}

std::optional<double> Fabric::clip_gradients(FabricOptimizer& optimizer,
                                             const ClipGradientsOptions& options) {
  if (options.max_norm.has_value() == options.clip_val.has_value()) {
    throw std::invalid_argument(
        "Fabric::clip_gradients: set exactly one of max_norm and clip_val (got " +
        std::string(options.max_norm ? "both" : "neither") + ")");
  }
  precision_->unscale_gradients(*optimizer.optimizer());
  std::vector<at::Tensor> params;
  for (const auto& group : optimizer->param_groups()) {
    for (const auto& param : group.params()) params.push_back(param);
  }
  if (options.max_norm) {
    return strategy_->clip_gradients_norm(params, *options.max_norm, options.norm_type,
                                          options.error_if_nonfinite);
  }
  strategy_->clip_gradients_value(params, *options.clip_val);
  return std::nullopt;
}

precision::ScopePtr Fabric::autocast() const { return precision_->forward_context(); }

at::Tensor Fabric::to_device(const at::Tensor& tensor) const { return tensor.to(device()); }

torch::data::Example<> Fabric::to_device(const torch::data::Example<>& batch) const {
  return {to_device(batch.data), to_device(batch.target)};
}

std::vector<at::Tensor> Fabric::to_device(const std::vector<at::Tensor>& tensors) const {
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (const auto& t : tensors) out.push_back(to_device(t));
  return out;
}

uint64_t Fabric::seed_everything(std::optional<uint64_t> seed) {
  if (!seed) {
    const char* env = std::getenv("PL_GLOBAL_SEED");
    seed = 0;
    if (env && *env) {
      try {
        seed = std::stoull(env);
      } catch (const std::exception&) {
        throw std::invalid_argument(std::string("PL_GLOBAL_SEED='") + env +
                                    "' is not a non-negative integer");
      }
    }
  }
  torch::manual_seed(*seed);
  std::srand(static_cast<unsigned>(*seed));
  ::setenv("PL_GLOBAL_SEED", std::to_string(*seed).c_str(), 1);
  seed_ = seed;
  return *seed;
}

void Fabric::log(const std::string& name, double value, int64_t step) {
  log_dict({{name, value}}, step);
}

void Fabric::log_dict(const std::map<std::string, double>& metrics, int64_t step) {
  if (step < 0) step = next_log_step_;
  next_log_step_ = step + 1;
  if (!is_global_zero()) return;
  for (auto& logger : options_.loggers) logger->log_metrics(metrics, step);
}

void Fabric::call(const std::string& hook) {
  for (auto& callback : options_.callbacks) callback->on(hook, *this);
}

void Fabric::barrier() { strategy_->barrier(); }

int64_t Fabric::global_rank() const { return strategy_->global_rank(); }
int64_t Fabric::local_rank() const { return strategy_->local_rank(); }
int64_t Fabric::node_rank() const { return strategy_->node_rank(); }
int64_t Fabric::world_size() const { return strategy_->world_size(); }
c10::Device Fabric::device() const { return strategy_->root_device(); }

}  // namespace fabric
