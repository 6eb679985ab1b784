// The Strategy interface: how a module and its optimizer are placed on the ranks'
// devices and how gradients are made consistent across ranks. Fabric owns one
// strategy and routes setup, backward, clipping and collectives through it.
// Strategies know nothing of Fabric; precision is passed in where it matters.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

namespace torch::nn {
class Module;
}

namespace fabric::precision {
class Precision;
}

namespace fabric::strategies {

class Strategy {
 public:
  virtual ~Strategy() = default;

  virtual std::string name() const = 0;
  // The device this rank computes on.
  virtual c10::Device root_device() const = 0;
  virtual int64_t global_rank() const { return 0; }
  virtual int64_t local_rank() const { return 0; }
  virtual int64_t node_rank() const { return 0; }
  virtual int64_t world_size() const { return 1; }
  bool is_global_zero() const { return global_rank() == 0; }

  // Called by Fabric::launch() once the ranks exist (creates process groups).
  virtual void setup_environment() {}
  // Moves the (already dtype-converted) module to root_device() and prepares it.
  virtual void setup_module(torch::nn::Module& module) = 0;
  // Runs backward from the loss the precision plugin hands back.
  virtual void backward(const at::Tensor& loss, precision::Precision& precision);
  // Clips the gradients of `parameters` to a total `norm_type` norm of `max_norm`;
  // returns the total norm before clipping.
  virtual double clip_gradients_norm(const std::vector<at::Tensor>& parameters, double max_norm,
                                     double norm_type, bool error_if_nonfinite);
  // Clamps every gradient element of `parameters` into [-clip_val, clip_val].
  virtual void clip_gradients_value(const std::vector<at::Tensor>& parameters, double clip_val);
  // Called by a set-up module before each forward (DDP re-broadcasts buffers).
  virtual void pre_forward(torch::nn::Module& /*module*/) {}
  // Turns gradient synchronisation in backward off and on (no_backward_sync).
  virtual void set_gradient_sync(bool /*enabled*/) {}
  virtual bool gradient_sync() const { return true; }

  // Collectives. With one process they leave the data as it is.
  enum class ReduceOp { kSum, kMean, kMax, kMin };
  // Reduces `tensor` across ranks in place.
  virtual void all_reduce(at::Tensor& /*tensor*/, ReduceOp /*op*/) {}
  // Overwrites `tensor` with rank `src`'s (same shape and dtype on every rank).
  virtual void broadcast(at::Tensor& /*tensor*/, int64_t /*src*/) {}
  // Every rank's `tensor`, stacked along a new leading world dimension.
  virtual at::Tensor all_gather(const at::Tensor& tensor) { return tensor.unsqueeze(0); }
  // Waits for every rank (nothing to wait for on one process).
  virtual void barrier() {}
};

}  // namespace fabric::strategies
