// "fsdp": fully sharded data parallel on c10d collectives (Open MPI for CPU
// tensors, NCCL for CUDA), after PyTorch's FSDP with use_orig_params, which is
// what Lightning uses for fabric.setup(model, optimizer).
//
// At set-up, rank 0's state is broadcast; then each set-up module's parameters
// (per dtype) are flattened into one buffer padded to a multiple of world_size,
// and each rank keeps its 1/world_size slice (the shard). Every parameter keeps
// its identity (module members, user pointers and optimizer state keys stay
// valid) but, between steps, holds only its piece of this rank's shard: a 1-D
// tensor, possibly empty. So an optimizer built over model->parameters() before
// setup allocates state only for this rank's pieces, and a checkpoint of the
// optimizer is gathered back to full shapes (full_state_context).
//
// A training forward all-gathers the full parameters (each parameter then views
// its slice of the gathered buffer); backward's gradients are flattened,
// reduce-scattered (averaged) and each parameter goes back to its piece with its
// gradient piece. no_backward_sync keeps the full parameters and gradients
// (accumulation), as FSDP does. A forward without gradients (eval, no_grad)
// frees the gathered parameters as soon as it returns.
//
// What breaks while parameters are sharded (between steps, outside forward):
// reading a parameter's values or shape, calling a submodule directly, and
// Module::to/clone. Inside fabric.save/load and a forward they are whole.
// Not yet: wrapping blocks as separate units (so the peak is the whole model),
// overlapping reduce-scatter with backward, "sharded" checkpoints, and fp16 loss
// scaling ("16-mixed"): each is an error or documented, not silently wrong.
#pragma once

#include <memory>
#include <vector>

#include "strategies/options.h"
#include "strategies/parallel.h"

namespace fabric::strategies {

class FSDPStrategy : public ParallelStrategy {
 public:
  // Throws std::invalid_argument for an unknown sharding_strategy or state_dict_type.
  FSDPStrategy(Topology topology, ProcessGroupOptions process_group, FSDPOptions options = {});
  ~FSDPStrategy() override;

  void setup_module(torch::nn::Module& module) override;
  precision::ScopePtr forward_context(torch::nn::Module& module) override;
  // Also refuses an optimizer that already has state (it would be full-sized).
  void setup_optimizer(torch::optim::Optimizer& optimizer) override;
  at::Tensor optimizer_step(torch::optim::Optimizer& optimizer, precision::Precision& precision,
                            const precision::LossClosure& closure) override;
  void backward(const at::Tensor& loss, precision::Precision& precision) override;
  // The norm over every rank's gradient pieces (one all-reduce).
  double clip_gradients_norm(torch::nn::Module* module, torch::optim::Optimizer& optimizer,
                             precision::Precision& precision, double max_norm, double norm_type,
                             bool error_if_nonfinite) override;
  precision::ScopePtr full_state_context(const std::vector<torch::nn::Module*>& modules,
                                         const std::vector<torch::optim::Optimizer*>& optimizers,
                                         bool loading) override;

  const FSDPOptions& options() const { return options_; }
  // Bytes of gathered (full) parameter buffers alive now, and the most at once
  // since the last reset: the strategy's own accounting, for memory tests.
  int64_t gathered_bytes() const { return gathered_bytes_; }
  int64_t peak_gathered_bytes() const { return peak_gathered_bytes_; }
  void reset_peak_gathered_bytes() { peak_gathered_bytes_ = gathered_bytes_; }

  struct FlatUnit;  // (fsdp.cpp) one flat, sharded buffer of parameters

 private:
  struct ModuleState;
  class StateScope;
  class ForwardScope;
  ModuleState* find(const torch::nn::Module* module);
  void unshard(FlatUnit& unit);
  // Points the parameters back at their pieces and frees the gathered buffer;
  // copy_back first copies this rank's slice of it into the shard (after a load).
  void reshard(FlatUnit& unit, bool copy_back);
  void reduce_gradients(FlatUnit& unit);
  bool sharded() const { return options_.sharding_strategy != "NO_SHARD"; }

  FSDPOptions options_;
  std::vector<std::unique_ptr<ModuleState>> modules_;
  int64_t gathered_bytes_ = 0;
  int64_t peak_gathered_bytes_ = 0;
};

}  // namespace fabric::strategies
