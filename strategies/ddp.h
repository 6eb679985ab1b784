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
// gradient are an error unless find_unused_parameters, which treats them as zero.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include "strategies/process_group.h"
#include "strategies/strategy.h"

namespace fabric::strategies {

struct DDPOptions {
  bool find_unused_parameters = false;
  // Leave each gradient as a view into its bucket after the sync instead of
  // copying it back: saves one copy of the gradients' memory and time.
  bool gradient_as_bucket_view = false;
  double bucket_cap_mb = 25.0;
  double first_bucket_cap_mb = 1.0;
  // Re-broadcast rank 0's buffers (BatchNorm statistics) before every forward.
  bool broadcast_buffers = true;
};

// Where this rank sits in the job.
struct Topology {
  std::vector<c10::Device> parallel_devices;  // this node's devices
  int num_nodes = 1;
  int64_t global_rank = 0;
  int64_t local_rank = 0;
  int64_t node_rank = 0;
  int64_t world_size = 1;
};

// Time spent in gradient all-reduce and how much of it ran while backward was
// still computing (measured with the MPI backend's per-collective timestamps).
struct DDPStats {
  double comm_seconds = 0;
  double hidden_seconds = 0;
  int64_t buckets_reduced = 0;
};

class DDPStrategy : public Strategy {
 public:
  DDPStrategy(Topology topology, ProcessGroupOptions process_group, DDPOptions options = {});
  ~DDPStrategy() override;

  std::string name() const override { return "ddp"; }
  c10::Device root_device() const override;
  int64_t global_rank() const override { return topology_.global_rank; }
  int64_t local_rank() const override { return topology_.local_rank; }
  int64_t node_rank() const override { return topology_.node_rank; }
  int64_t world_size() const override { return topology_.world_size; }

  void setup_environment() override;
  void setup_module(torch::nn::Module& module) override;
  void pre_forward(torch::nn::Module& module) override;
  void backward(const at::Tensor& loss, precision::Precision& precision) override;
  void set_gradient_sync(bool enabled) override { sync_ = enabled; }
  bool gradient_sync() const override { return sync_; }

  void all_reduce(at::Tensor& tensor, ReduceOp op) override;
  void broadcast(at::Tensor& tensor, int64_t src) override;
  at::Tensor all_gather(const at::Tensor& tensor) override;
  void barrier() override;

  const DDPOptions& options() const { return options_; }
  const DDPStats& stats() const { return stats_; }
  void reset_stats() { stats_ = {}; }
  // Number of buckets of each set-up module, for tests.
  std::vector<size_t> bucket_counts() const;

 private:
  struct ModuleState;
  c10d::Backend& backend() const;
  // Starts the all-reduce of full buckets in order; the caller holds state's mutex.
  void launch_full_buckets(ModuleState& state);
  void finish_sync(ModuleState& state, std::chrono::steady_clock::time_point backward_end);

  Topology topology_;
  ProcessGroupOptions pg_options_;
  DDPOptions options_;
  ProcessGroupHandle pg_;
  bool sync_ = true;
  std::vector<std::unique_ptr<ModuleState>> modules_;
  DDPStats stats_;
};

}  // namespace fabric::strategies
