// fabric::Fabric: the one object a training loop talks to. It resolves the
// accelerator, devices, strategy and precision from FabricOptions, and hands back
// wrappers around the user's own module, optimizer and dataset that put the
// precision and distribution around them. There is no Trainer: the loop stays the
// user's.
//
//   fabric::Fabric fabric({.accelerator = "cpu", .precision = "bf16-mixed"});
//   fabric.launch();
//   auto [net, opt] = fabric.setup(model, optimizer);
//   auto loader = fabric.setup_dataloader(dataset, {.batch_size = 64, .shuffle = true});
//   for (auto& batch : loader) {
//     opt.zero_grad();
//     auto loss = torch::mse_loss(net(batch.data), batch.target);
//     fabric.backward(loss);
//     opt.step();
//   }
#pragma once

#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>
#include <torch/data/example.h>
#include <torch/nn/pimpl.h>

#include "fabric/callback.h"
#include "checkpoint/checkpoint.h"
#include "fabric/connector.h"
#include "fabric/dataloader.h"
#include "loggers/logger.h"
#include "fabric/module_wrapper.h"
#include "fabric/optimizer_wrapper.h"
#include "fabric/options.h"
#include "precision/precision.h"
#include "strategies/strategy.h"

namespace fabric {

namespace launchers {
class LocalRanks;
}

struct ClipGradientsOptions {
  // Exactly one of the two: scale gradients so their total norm is at most
  // max_norm, or clamp each gradient element into [-clip_val, clip_val].
  std::optional<double> max_norm;
  std::optional<double> clip_val;
  double norm_type = 2.0;
  // Throw when the total norm is inf/nan instead of clipping with it.
  bool error_if_nonfinite = true;
};

class Fabric {
 public:
  // Validates and resolves every option; throws std::invalid_argument naming a bad
  // value and the valid ones.
  explicit Fabric(FabricOptions options = {});
  ~Fabric();
  Fabric(const Fabric&) = delete;
  Fabric& operator=(const Fabric&) = delete;

  // Starts the other ranks if this process must (multi-process strategies) and
  // connects this process to them. A no-op for a world of one, but harmless to call.
  // With max_restarts > 0 in a program nothing launched, it does not return: this
  // process supervises attempts of the whole job and exits with its status.
  void launch();
  // launch(), then fn(*this); returns what fn returns.
  template <typename F>
  auto launch(F&& fn) {
    launch();
    return std::forward<F>(fn)(*this);
  }

  // Converts the module to the precision's dtype, moves it to the device, and wraps
  // it; wraps each optimizer. Returns the module wrapper alone, or a tuple
  // (module, optimizer...) for structured bindings.
  template <typename M, typename... O>
  auto setup(std::shared_ptr<M> module, std::shared_ptr<O>... optimizers) {
    auto wrapped = setup_module(std::move(module));
    if constexpr (sizeof...(O) == 0) {
      return wrapped;
    } else {
      return std::make_tuple(wrapped, setup_optimizer(std::move(optimizers))...);
    }
  }
  // Accepts LibTorch module holders (torch::nn::Linear, TORCH_MODULE types).
  template <typename Impl, typename... O>
  auto setup(torch::nn::ModuleHolder<Impl> module, std::shared_ptr<O>... optimizers) {
    return setup(module.ptr(), std::move(optimizers)...);
  }
  template <typename M>
  FabricModule<M> setup_module(std::shared_ptr<M> module) {
    check_module(module.get());
    place_module(*module);
    return FabricModule<M>(std::move(module), strategy_->precision_plugin(), strategy_);
  }
  template <typename Impl>
  FabricModule<Impl> setup_module(torch::nn::ModuleHolder<Impl> module) {
    return setup_module(module.ptr());
  }
  FabricOptimizer setup_optimizer(std::shared_ptr<torch::optim::Optimizer> optimizer);
  template <typename... O>
  auto setup_optimizers(std::shared_ptr<O>... optimizers) {
    return std::make_tuple(setup_optimizer(std::move(optimizers))...);
  }

  // A loader over `dataset` whose batches arrive on device(); shards across ranks
  // and reshuffles every epoch (see dataloader.h).
  template <typename Dataset>
  FabricDataLoader<Dataset> setup_dataloader(Dataset dataset, DataLoaderOptions options = {}) {
    SamplerOptions sampler;
    sampler.num_replicas = strategy().data_parallel_size();
    sampler.rank = strategy().data_parallel_rank();
    sampler.shuffle = options.shuffle;
    sampler.seed = options.seed.value_or(seed_.value_or(0));
    sampler.drop_last = options.drop_last;
    std::optional<c10::Device> device;
    if (options.move_to_device) device = this->device();
    return FabricDataLoader<Dataset>(std::move(dataset), options, sampler, device);
  }
  template <typename... Datasets>
  auto setup_dataloaders(DataLoaderOptions options, Datasets... datasets) {
    return std::make_tuple(setup_dataloader(std::move(datasets), options)...);
  }

  // Backward through the precision plugin (loss scaling) and the strategy
  // (gradient synchronisation).
  void backward(const at::Tensor& loss);
  // Unscales the optimizer's gradients first, then clips them by norm or value.
  // Returns the total norm before clipping (max_norm), or nullopt (clip_val).
  // The strategy computes the norm over every rank's part of the gradients.
  template <typename M>
  std::optional<double> clip_gradients(const FabricModule<M>& module, FabricOptimizer& optimizer,
                                       const ClipGradientsOptions& options) {
    return clip_gradients(module.base().get(), optimizer, options);
  }
  std::optional<double> clip_gradients(FabricOptimizer& optimizer,
                                       const ClipGradientsOptions& options) {
    return clip_gradients(nullptr, optimizer, options);
  }

  // The precision's forward context (e.g. autocast) for code outside a set-up
  // module's forward; held until the returned object is destroyed.
  precision::ScopePtr autocast() const;

  // Builds M(args...) with parameters in the precision's dtype, on device(). It
  // is not set up yet: pass it to setup() as usual (which sets it up once).
  template <typename M, typename... Args>
  std::shared_ptr<M> init_module(Args&&... args) {
    std::shared_ptr<M> module;
    {
      auto precision_scope = strategy_->precision().module_init_context();
      auto strategy_scope = strategy_->module_init_context();
      module = std::make_shared<M>(std::forward<Args>(args)...);
    }
    strategy_->precision().convert_module(*module);
    strategy_->module_to_device(*module);
    return module;
  }

  at::Tensor to_device(const at::Tensor& tensor) const;
  torch::data::Example<> to_device(const torch::data::Example<>& batch) const;
  std::vector<at::Tensor> to_device(const std::vector<at::Tensor>& tensors) const;

  // Prints the arguments (streamed, then a newline) on global rank zero only.
  template <typename... Args>
  void print(const Args&... args) const {
    if (!is_global_zero()) return;
    std::ostringstream line;
    (line << ... << args);
    std::cout << line.str() << std::endl;
  }

  // Seeds LibTorch's CPU and CUDA generators and C's rand(); records the seed for
  // the data loaders' shuffling and in PL_GLOBAL_SEED. Without an argument uses
  // PL_GLOBAL_SEED, else 0. Returns the seed used.
  uint64_t seed_everything(std::optional<uint64_t> seed = std::nullopt);

  // Writes `state` (modules, optimizers, RNG state, tensors, numbers, strings,
  // nested maps) to `path` atomically, in PyTorch's file format. Every rank must
  // call it (a sharding strategy gathers); global rank 0 writes; every rank
  // returns once the file is complete, and every rank throws if the write failed.
  void save(const std::string& path, const State& state);
  // Restores `state` from `path` in place (modules and optimizers loaded, plain
  // values replaced) on every rank; returns the entries not asked for. strict:
  // missing keys and module mismatches throw, listing every problem.
  LoadResult load(const std::string& path, State& state, bool strict = true);
  // A bare state dict (e.g. Python's torch.save(model.state_dict())).
  template <typename M>
  void load_raw(const std::string& path, const FabricModule<M>& module, bool strict = true) {
    load_raw(path, *module.base(), strict);
  }
  void load_raw(const std::string& path, torch::nn::Module& module, bool strict = true);
  void load_raw(const std::string& path, FabricOptimizer& optimizer);

  // Sends metrics to every logger, on global rank zero only. step < 0 means "one
  // more than the last step logged".
  void log(const std::string& name, double value, int64_t step = -1);
  void log_dict(const std::map<std::string, double>& metrics, int64_t step = -1);
  // Sends hyper-parameters to every logger, on global rank zero only.
  void log_hyperparams(const HyperParameters& params);
  // Calls hook `hook` on every callback, in order.
  void call(const std::string& hook);

  // Collectives over all ranks; with one process they pass data through.
  // Waits until every rank gets here.
  void barrier();
  // Reduces `tensor` across ranks in place and returns it. op: "sum", "mean",
  // "max", "min". The tensor may live anywhere; it is reduced on device().
  at::Tensor all_reduce(at::Tensor tensor, const std::string& op = "mean");
  double all_reduce(double value, const std::string& op = "mean");
  // Every rank's tensor stacked along a new leading dimension of size world_size().
  at::Tensor all_gather(const at::Tensor& tensor);
  // Rank `src`'s tensor (same shape and dtype on every rank).
  at::Tensor broadcast(at::Tensor tensor, int64_t src = 0);
  // Rank `src`'s value, sent serialised (strings, numbers, lists, dicts, tensors).
  std::string broadcast(const std::string& value, int64_t src = 0);
  c10::IValue broadcast(const c10::IValue& value, int64_t src = 0);

  // RAII guard: gradients are not synchronised in the backward passes inside it
  // (gradient accumulation). `enabled=false` makes it a no-op.
  class NoBackwardSync {
   public:
    NoBackwardSync(strategies::Strategy& strategy, bool enabled);
    ~NoBackwardSync();
    NoBackwardSync(const NoBackwardSync&) = delete;
    NoBackwardSync& operator=(const NoBackwardSync&) = delete;

   private:
    strategies::Strategy& strategy_;
    bool previous_;
  };
  template <typename M>
  NoBackwardSync no_backward_sync(const FabricModule<M>& /*module*/, bool enabled = true) {
    return NoBackwardSync(*strategy_, enabled);
  }
  // RAII guard: rank 0 runs the scope first, the other ranks after it (e.g. so
  // rank 0 downloads or prepares data once).
  class RankZeroFirst {
   public:
    explicit RankZeroFirst(Fabric& fabric);
    ~RankZeroFirst() noexcept(false);
    RankZeroFirst(const RankZeroFirst&) = delete;
    RankZeroFirst& operator=(const RankZeroFirst&) = delete;

   private:
    Fabric& fabric_;
  };
  RankZeroFirst rank_zero_first() { return RankZeroFirst(*this); }

  int64_t global_rank() const;
  int64_t rank() const { return global_rank(); }
  int64_t local_rank() const;
  int64_t node_rank() const;
  int64_t world_size() const;
  bool is_global_zero() const { return global_rank() == 0; }
  c10::Device device() const;

  const std::string& accelerator() const { return accelerator_name_; }
  // The strategy's precision plugin (the strategy owns it, as in Lightning).
  precision::Precision& precision() const { return strategy_->precision(); }
  strategies::Strategy& strategy() const { return *strategy_; }
  const std::vector<std::shared_ptr<Logger>>& loggers() const { return options_.loggers; }
  const std::vector<std::shared_ptr<Callback>>& callbacks() const { return options_.callbacks; }

 private:
  void check_module(const torch::nn::Module* module) const;
  void place_module(torch::nn::Module& module);
  std::optional<double> clip_gradients(torch::nn::Module* module, FabricOptimizer& optimizer,
                                       const ClipGradientsOptions& options);

  FabricOptions options_;
  std::string accelerator_name_;
  std::shared_ptr<strategies::Strategy> strategy_;
  std::optional<uint64_t> seed_;
  int64_t next_log_step_ = 0;
  bool launched_ = false;
  bool needs_launch_ = false;
  Connection::NodeLaunch node_launch_;
  bool supervises_restarts_ = false;
  // Ranks this process spawned (CUDA); waited for when the Fabric is destroyed.
  std::unique_ptr<launchers::LocalRanks> local_ranks_;
};

}  // namespace fabric
