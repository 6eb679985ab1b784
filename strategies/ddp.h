// "ddp": data-parallel training, one process per device, as PyTorch's
// DistributedDataParallel does it. At setup, rank 0's parameters and buffers are
// broadcast to every rank. Gradients are packed into buckets (parameters in
// reverse registration order, the order backward produces them; the first bucket
// 1 MiB, the others 25 MiB); a post-accumulation hook on each parameter's gradient
// accumulator copies its gradient into its bucket, and a full bucket's all-reduce
// is started at once (buckets are started in index order on every rank), so
// communication overlaps with the rest of backward. After backward the strategy
// waits for the buckets and writes the averaged gradients back.
//
// Gradient sync happens in Fabric::backward (the loss must go through it);
// no_backward_sync turns it off for accumulation steps. Parameters that receive no
// gradient are an error unless find_unused_parameters: then the ranks agree on
// which parameters any of them used (one all-reduce of a used-map per backward,
// as PyTorch's reducer); a parameter used on some ranks averages with zeros from
// the others, one used on none keeps its gradient untouched (undefined after
// zero_grad, so optimizers skip it: no weight decay, no moment updates).
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include "strategies/options.h"
#include "strategies/parallel.h"

namespace fabric::strategies {

// Time spent in gradient all-reduce and how much of it ran while backward was
// still computing (measured with the MPI backend's per-collective timestamps).
struct DDPStats {
  double comm_seconds = 0;
  double hidden_seconds = 0;
  int64_t buckets_reduced = 0;
};

class DDPStrategy : public ParallelStrategy {
 public:
  DDPStrategy(Topology topology, ProcessGroupOptions process_group, DDPOptions options = {});
  ~DDPStrategy() override;

  // Broadcasts rank 0's state and registers the gradient hooks; a module already
  // set up is left as it is (init_module followed by setup, or setup twice).
  void setup_module(torch::nn::Module& module) override;
  // Re-broadcasts rank 0's buffers before a training forward (broadcast_buffers).
  precision::ScopePtr forward_context(torch::nn::Module& module) override;
  void backward(const at::Tensor& loss) override;

  const DDPOptions& options() const { return options_; }
  const DDPStats& stats() const { return stats_; }
  void reset_stats() { stats_ = {}; }
  // Number of buckets of each set-up module, for tests.
  std::vector<size_t> bucket_counts() const;

 private:
  struct ModuleState;
  // Starts the all-reduce of full buckets in order; the caller holds state's mutex.
  void launch_full_buckets(ModuleState& state);
  void finish_sync(ModuleState& state, std::chrono::steady_clock::time_point backward_end);

  DDPOptions options_;
  std::vector<std::unique_ptr<ModuleState>> modules_;
  DDPStats stats_;
};

}  // namespace fabric::strategies
