// "model_parallel": tensor parallelism inside a 2-D mesh of ranks, after
// Lightning's ModelParallelStrategy (DTensor TP + FSDP2 on a device mesh).
//
// The mesh is data_parallel_size x tensor_parallel_size; rank = dp_rank * tp +
// tp_rank (torch's init_device_mesh(("data_parallel", "tensor_parallel"))), so
// a tensor-parallel group is tp consecutive ranks, on one node when tp is the
// devices per node (the "auto" default: its all-reduces stay on the node's
// links). The strategy makes both groups of sub-process-groups (split Open MPI
// communicators, or NCCL groups over the world's store).
//
// Layers built with fabric::tp (tensor_parallel.h) split their weights over the
// tensor-parallel group and run its collectives. The data-parallel dimension
// is a whole strategy over the data-parallel group, the ranks that hold the
// same slices: fsdp (each slice sharded again over it) or ddp. The sampler
// shards the data by the data-parallel rank, so tensor-parallel peers see the
// same batches. Clipping takes the norm over every rank's gradients with one
// world all-reduce, counting each slice once (split parameters once per
// tensor-parallel rank, replicated ones once per group). Under loss scaling
// every rank of the world agrees on inf/nan. fabric.save gathers the split
// parameters and their optimizer state, so the file is the unsplit model's.
#pragma once

#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "strategies/model_parallel/tensor_parallel.h"
#include "strategies/options.h"
#include "strategies/parallel.h"

namespace fabric::strategies {

struct MeshShape {
  int64_t data_parallel = 1;
  int64_t tensor_parallel = 1;
};
// Resolves the "auto" (0) sizes: tp = devices per node, dp = the rest of the
// world (the number of nodes when tp is auto). Throws std::invalid_argument
// when a size is negative or dp x tp is not the world size, naming the numbers.
MeshShape resolve_mesh_shape(const ModelParallelOptions& options, int64_t world_size,
                             int64_t devices_per_node);

class ModelParallelStrategy : public ParallelStrategy {
 public:
  // Throws std::invalid_argument for a bad mesh, data_parallel or state_dict_type.
  ModelParallelStrategy(Topology topology, ProcessGroupOptions process_group,
                        ModelParallelOptions options = {}, DDPOptions ddp = {},
                        FSDPOptions fsdp = {});
  ~ModelParallelStrategy() override;

  const MeshShape& mesh() const { return mesh_; }
  int64_t tensor_parallel_rank() const { return tp_rank_; }
  int64_t data_parallel_size() const override { return mesh_.data_parallel; }
  int64_t data_parallel_rank() const override { return dp_rank_; }
  // The group fabric::tp's layers split over (a group of one before launch()).
  tp::Group tensor_parallel_group() const;
  // The strategy that runs the data-parallel dimension (ddp or fsdp).
  ParallelStrategy& data_parallel_strategy() { return *dp_; }

  void setup_environment() override;
  void set_precision(std::shared_ptr<precision::Precision> precision) override;
  // Broadcasts the replicated parameters and buffers over the tensor-parallel
  // group (rank 0's), then hands the module to the data-parallel strategy.
  // Throws when a fabric::tp layer was built for another group.
  void setup_module(torch::nn::Module& module) override;
  precision::ScopePtr forward_context(torch::nn::Module& module) override;
  void setup_optimizer(torch::optim::Optimizer& optimizer) override;
  at::Tensor optimizer_step(torch::optim::Optimizer& optimizer,
                            const precision::LossClosure& closure) override;
  void backward(const at::Tensor& loss) override;
  void set_gradient_sync(bool enabled) override;
  bool gradient_sync() const override;
  double clip_gradients_norm(torch::nn::Module* module, torch::optim::Optimizer& optimizer,
                             double max_norm, double norm_type, bool error_if_nonfinite) override;
  void clip_gradients_value(torch::nn::Module* module, torch::optim::Optimizer& optimizer,
                            double clip_val) override;
  precision::ScopePtr full_state_context(const std::vector<torch::nn::Module*>& modules,
                                         const std::vector<torch::optim::Optimizer*>& optimizers,
                                         bool loading) override;
  // state_dict_type="sharded": a DCP directory in which each rank writes what it
  // holds at rest. A split parameter's slice (and under fsdp the data-parallel
  // piece of it) is written as ranges of the unsplit tensor, so the directory
  // has the unsplit model's keys and shapes and loads at any mesh, single-device
  // and in Python. A piece several ranks hold alike is written by one of them.
  bool sharded_checkpoints() const override { return options_.state_dict_type == "sharded"; }
  std::optional<ParameterShard> parameter_shard(const at::Tensor& param) const override;
  at::Tensor parameter_of(const at::Tensor& optimizer_tensor) const override;
  precision::ScopePtr sharded_state_context(const std::vector<torch::nn::Module*>& modules,
                                            const std::vector<torch::optim::Optimizer*>& optimizers,
                                            bool loading) override;

 private:
  class WholeStateScope;
  // The split of a parameter of a set-up module; nullptr for a replicated one.
  const tp::Split* split_of(const at::Tensor& param) const;

  ModelParallelOptions options_;
  MeshShape mesh_;
  int64_t tp_rank_ = 0, dp_rank_ = 0;
  std::shared_ptr<ParallelStrategy> dp_;
  bool dp_is_fsdp_ = false;
  ProcessGroupHandle tp_pg_;
  // Split parameters of the set-up modules, by tensor (kept alive, so an address
  // is never taken by another tensor while it is here).
  std::unordered_map<const void*, std::pair<at::Tensor, tp::Split>> splits_;
  precision::GradScaler* reducing_scaler_ = nullptr;
};

}  // namespace fabric::strategies
