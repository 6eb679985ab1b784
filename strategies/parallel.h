// What every multi-process strategy shares: the rank's place in the job, the c10d
// process group (created in setup_environment), the collectives Fabric exposes,
// and the no_backward_sync switch. DDP and FSDP derive from it and add only how
// they treat modules, gradients and optimizer state.
#pragma once

#include <functional>
#include <string>

#include <torch/csrc/distributed/c10d/Backend.hpp>

#include "strategies/process_group.h"
#include "strategies/strategy.h"

namespace fabric::strategies {

class ParallelStrategy : public Strategy {
 public:
  // Validates that local_rank has a device and that the backend serves it.
  ParallelStrategy(std::string name, Topology topology, ProcessGroupOptions process_group);
  // Shuts the process group down (NCCL needs it before destruction).
  ~ParallelStrategy() override;

  std::string name() const override { return name_; }
  c10::Device root_device() const override;
  const Topology& topology() const override { return topology_; }

  void setup_environment() override;
  void set_gradient_sync(bool enabled) override { sync_ = enabled; }
  bool gradient_sync() const override { return sync_; }

  void all_reduce(at::Tensor& tensor, ReduceOp op) override;
  void broadcast(at::Tensor& tensor, int64_t src) override;
  at::Tensor all_gather(const at::Tensor& tensor) override;
  // An all-reduce whose result the host waits for: c10d's wait() on a CUDA work
  // only orders the current stream, which is not a barrier for the host.
  void barrier() override;

  // This rank's backend for root_device(); throws if launch() has not run yet.
  c10d::Backend& backend() const;
  bool has_process_group() const { return static_cast<bool>(pg_.group); }
  const ProcessGroupHandle& process_group() const { return pg_; }
  // Runs this strategy on a group someone else made (a data-parallel row of
  // model_parallel's mesh) instead of creating one in setup_environment: the
  // topology's global_rank and world_size must be this rank's place in it.
  void adopt_process_group(ProcessGroupHandle group);

 protected:
  // Broadcasts rank 0's parameters and buffers of `module` to every rank (of
  // `backend`, this strategy's own by default; only the parameters `include`
  // accepts, when given).
  void broadcast_module_state(torch::nn::Module& module);
  void broadcast_module_state(torch::nn::Module& module, c10d::Backend& backend,
                              const std::function<bool(const at::Tensor& param)>& include = {});
  // clip_gradients_norm for a strategy whose optimizer holds disjoint pieces of
  // the gradients on each rank (fsdp, ZeRO): unscales, takes the norm over every
  // rank's pieces (one all-reduce), scales them; returns the norm before clipping.
  // `share` (optional) weighs each parameter's sum of |g|^p: the fraction of the
  // ranks that hold this gradient and would otherwise count it again (1/n for a
  // gradient n ranks hold the same copy of); the inf-norm ignores it.
  double clip_pieces_norm(torch::optim::Optimizer& optimizer, double max_norm, double norm_type,
                          bool error_if_nonfinite,
                          const std::function<double(const at::Tensor& param)>& share = {});

  std::string name_;
  Topology topology_;
  ProcessGroupOptions pg_options_;
  ProcessGroupHandle pg_;
  bool sync_ = true;
};

}  // namespace fabric::strategies
