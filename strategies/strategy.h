// The Strategy interface: how a module and its optimizer are placed on the ranks'
// devices, how gradients are made consistent across ranks, and what a checkpoint
// holds per rank. Fabric owns one strategy and routes module set-up, forward,
// backward, the optimizer step, gradient clipping, checkpoints and collectives
// through it.
//
// A strategy owns its precision plugin, as Lightning's strategy.precision: it
// runs backward from the loss the plugin scales, steps and clips through it, and
// a sharding strategy adapts what the plugin implies (FSDP reduces gradients in
// its compute dtype and makes ranks agree on inf/nan under loss scaling).
//
// What a strategy does not know: Fabric itself, option strings, and how ranks
// were started (launchers/). Every hook has a default that is right for one
// process on one device; a new strategy is one file plus one registration
// (strategies/registry.h: register_strategy, or an entry of its built-in table).
//
// Scopes (precision::ScopePtr) are RAII: the state they set up (gathered
// parameters, re-broadcast buffers) lasts while the returned object lives.
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include "precision/precision.h"
#include "strategies/topology.h"

namespace torch::nn {
class Module;
}
namespace torch::optim {
class Optimizer;
}

namespace fabric::strategies {

class Strategy {
 public:
  // Starts with "32-true" (precision::TruePrecision(Float)) until set_precision.
  Strategy();
  virtual ~Strategy() = default;

  virtual std::string name() const = 0;
  // The device this rank computes on.
  virtual c10::Device root_device() const = 0;
  // Where this rank sits in the job (one process, rank 0, by default).
  virtual const Topology& topology() const;
  int64_t global_rank() const { return topology().global_rank; }
  int64_t local_rank() const { return topology().local_rank; }
  int64_t node_rank() const { return topology().node_rank; }
  int64_t world_size() const { return topology().world_size; }
  bool is_global_zero() const { return global_rank() == 0; }
  // The ranks that see different data, and this rank's place among them: the
  // sampler shards the data by these. Every rank by default; model_parallel's
  // tensor-parallel peers see the same batches (its data-parallel dimension).
  virtual int64_t data_parallel_size() const { return world_size(); }
  virtual int64_t data_parallel_rank() const { return global_rank(); }

  // Called by Fabric::launch() once the ranks exist (creates process groups).
  virtual void setup_environment() {}

  // --- precision
  // The plugin this strategy runs with. Fabric hands it its own (the `precision`
  // option or FabricOptions::precision_plugin) when it is built, replacing any
  // set earlier; set it before setup. Throws std::invalid_argument for null.
  virtual void set_precision(std::shared_ptr<precision::Precision> precision);
  precision::Precision& precision() const { return *precision_; }
  const std::shared_ptr<precision::Precision>& precision_plugin() const { return precision_; }

  // --- modules
  // Held while Fabric::init_module constructs a module (after precision's scope).
  virtual precision::ScopePtr module_init_context() { return nullptr; }
  // Puts a freshly built module on root_device() without preparing it for
  // training (Fabric::init_module; setup comes later).
  virtual void module_to_device(torch::nn::Module& module);
  // Moves the (already dtype-converted) module to root_device() and prepares it
  // for training. Setting up the same module again is a no-op.
  virtual void setup_module(torch::nn::Module& module) = 0;
  // Held around every forward of a set-up module (DDP re-broadcasts buffers here).
  virtual precision::ScopePtr forward_context(torch::nn::Module& /*module*/) { return nullptr; }

  // --- optimizers
  // Checks an optimizer before training: by default every parameter must already
  // be on root_device(). Throws std::invalid_argument with what to do.
  virtual void setup_optimizer(torch::optim::Optimizer& optimizer);
  // Takes one step through the precision plugin (unscale, inf/nan skip).
  virtual at::Tensor optimizer_step(torch::optim::Optimizer& optimizer,
                                    const precision::LossClosure& closure);

  // --- backward and gradients
  // Runs backward from the loss the precision plugin hands back, then makes the
  // gradients consistent across ranks.
  virtual void backward(const at::Tensor& loss);
  // Turns gradient synchronisation in backward off and on (no_backward_sync).
  virtual void set_gradient_sync(bool /*enabled*/) {}
  virtual bool gradient_sync() const { return true; }
  // Unscales, then clips the gradients of the optimizer's parameters to a total
  // `norm_type` norm of `max_norm`; returns the total norm before clipping.
  // `module` (may be null) is the set-up module the optimizer belongs to.
  virtual double clip_gradients_norm(torch::nn::Module* module, torch::optim::Optimizer& optimizer,
                                     double max_norm, double norm_type, bool error_if_nonfinite);
  // Unscales, then clamps every gradient element into [-clip_val, clip_val].
  virtual void clip_gradients_value(torch::nn::Module* module, torch::optim::Optimizer& optimizer,
                                    double clip_val);

  // --- checkpoints
  // Held while Fabric takes (loading=false) or restores (loading=true) the state
  // dicts of these modules and optimizers for a full checkpoint. Inside it they
  // show full parameters and optimizer state; a sharding strategy gathers them on
  // entry and, after a load, shards the restored values back on exit.
  virtual precision::ScopePtr full_state_context(
      const std::vector<torch::nn::Module*>& /*modules*/,
      const std::vector<torch::optim::Optimizer*>& /*optimizers*/, bool /*loading*/) {
    return nullptr;
  }
  // Sharded checkpoints (fsdp with state_dict_type="sharded"): whether
  // fabric.save writes a distributed-checkpoint directory of what each rank
  // holds at rest (checkpoint/sharded_checkpoint.h) instead of one full file.
  virtual bool sharded_checkpoints() const { return false; }
  // For a sharded checkpoint: where a parameter whose tensor between steps is
  // only this rank's flat piece of it lies in the whole (its full shape, and the
  // piece's first element in the flattened parameter); nullopt for one held whole.
  struct ParameterShard {
    std::vector<int64_t> full_shape;
    int64_t flat_offset = 0;
    // When not empty, instead of flat_offset: the piece, flattened, is these
    // ranges {first element, count} of the flattened whole in turn (a
    // tensor-parallel slice is one range per contiguous run of it).
    std::vector<std::pair<int64_t, int64_t>> ranges;
    // false: another rank holds the same piece and writes it.
    bool owner = true;
  };
  virtual std::optional<ParameterShard> parameter_shard(const at::Tensor& /*param*/) const {
    return std::nullopt;
  }
  // For a sharded checkpoint, where the optimizer steps stand-ins instead of the
  // module's parameters (ZeRO's pieces, fp32 masters): the module parameter a
  // stand-in belongs to, whose name keys its state; undefined for anything else.
  virtual at::Tensor parameter_of(const at::Tensor& /*optimizer_tensor*/) const { return {}; }
  // Held around a sharded save (loading=false) or load (true) of these modules
  // and optimizers: what the strategy must redo once a load has written into
  // what each rank holds (fp32 masters taken again from the loaded parameters).
  virtual precision::ScopePtr sharded_state_context(
      const std::vector<torch::nn::Module*>& /*modules*/,
      const std::vector<torch::optim::Optimizer*>& /*optimizers*/, bool /*loading*/) {
    return nullptr;
  }
  // Runs `write(path)` on the rank(s) that write checkpoints (global rank 0 by
  // default); every rank returns only when the write is over, and every rank
  // throws if it failed anywhere, so no rank is left waiting.
  virtual void save_checkpoint(const std::string& path,
                               const std::function<void(const std::string&)>& write);

  // --- collectives. With one process they leave the data as it is.
  enum class ReduceOp { kSum, kMean, kMax, kMin };
  // Reduces `tensor` across ranks in place.
  virtual void all_reduce(at::Tensor& /*tensor*/, ReduceOp /*op*/) {}
  // One number reduced across ranks (a failure flag, a found-inf flag); the
  // value itself on one process.
  double all_reduce_value(double value, ReduceOp op);
  // Overwrites `tensor` with rank `src`'s (same shape and dtype on every rank).
  virtual void broadcast(at::Tensor& /*tensor*/, int64_t /*src*/) {}
  // Every rank's `tensor`, stacked along a new leading world dimension.
  virtual at::Tensor all_gather(const at::Tensor& tensor) { return tensor.unsqueeze(0); }
  // Waits on the host until every rank gets here (nothing to wait for on one process).
  virtual void barrier() {}

 protected:
  std::shared_ptr<precision::Precision> precision_;
};

// The trainable parameters an optimizer updates, in group order.
std::vector<at::Tensor> optimizer_parameters(const torch::optim::Optimizer& optimizer);

}  // namespace fabric::strategies
