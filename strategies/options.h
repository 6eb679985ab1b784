// Options of the multi-process strategies, in their own structs (FabricOptions
// holds one of each, as `ddp` and `fsdp`). Plain data, no LibTorch headers, so
// fabric/options.h can include it cheaply.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

namespace torch::nn {
class Module;
}

namespace fabric::strategies {

// strategy="ddp", as PyTorch's DistributedDataParallel.
struct DDPOptions {
  // Parameters that get no gradient in a backward count as zero instead of an error.
  bool find_unused_parameters = false;
  // Leave each gradient as a view into its bucket after the sync instead of
  // copying it back: saves one copy of the gradients' memory and time.
  bool gradient_as_bucket_view = false;
  double bucket_cap_mb = 25.0;
  double first_bucket_cap_mb = 1.0;
  // Re-broadcast rank 0's buffers (BatchNorm statistics) before every forward.
  bool broadcast_buffers = true;
};

// Decides, at fsdp setup, whether a child of a torch::nn::Sequential becomes a
// sharding unit: given the child, its dotted path in the model and its number
// of parameter elements. Ready-made policies: strategies/auto_wrap.h.
using AutoWrapPolicy =
    std::function<bool(const torch::nn::Module& module, const std::string& path, int64_t num_params)>;

// strategy="fsdp": fully sharded data parallel, after Lightning's FSDPStrategy.
// The model is split into sharding units: blocks marked with fabric::Sharded
// (fabric/sharded.h) or chosen by auto_wrap_policy, and the root (everything
// else). Between steps each rank holds 1/world_size of every unit's parameters,
// gradients and optimizer state; a unit's full parameters exist only around its
// forward and its backward (see strategies/fsdp/fsdp.h).
struct FSDPOptions {
  // "FULL_SHARD" (ZeRO-3: parameters, gradients and optimizer state sharded;
  // a unit's parameters are freed after its forward and gathered again for its
  // backward), "SHARD_GRAD_OP" (ZeRO-2: parameters stay gathered from a unit's
  // forward until its backward), "NO_SHARD" (DDP's semantics: everything
  // replicated, gradients all-reduced).
  std::string sharding_strategy = "FULL_SHARD";
  // Which Sequential children become units (none when empty).
  AutoWrapPolicy auto_wrap_policy;
  // FULL_SHARD only: free a unit's gathered parameters after its forward (and
  // gather them again for its backward). false keeps them until the backward,
  // trading memory for one all-gather per unit per step.
  bool reshard_after_forward = true;
  // The dtype gradients are reduced in: "fp32", "bf16", "fp16", or "" for
  // Lightning's mapping from the precision (bf16 under "bf16-mixed"/"bf16-true",
  // fp16 under "16-mixed"/"16-true", else the parameters' own dtype).
  std::string reduce_dtype;
  // Whether the ranks check, before each all-gather, that they gather the same
  // unit (one 2-element all-reduce), so a model that runs different units on
  // different ranks fails with an error naming the unit instead of hanging or
  // mixing buffers: "first_step" (until the first optimizer step: catches a
  // model that differs between ranks at no later cost), "always" (also catches
  // data-dependent branches; about +20% step time for the GPT benchmark on the
  // CPU), "never".
  std::string check_unit_order = "first_step";
  // What fabric.save writes: "full" (rank 0 writes the same file DDP writes) or
  // "sharded" (a torch.distributed.checkpoint directory in Lightning's layout:
  // one data file per rank with what that rank holds, .metadata written last;
  // fabric.load reads it, and Python's dcp.load and Lightning read it, at any
  // world size; tools/consolidate_checkpoint turns it into one full file).
  std::string state_dict_type = "full";
};

}  // namespace fabric::strategies

namespace fabric::strategies {

// strategy="deepspeed" and its stage names: torchfabric's own implementation of
// DeepSpeed's ZeRO stages (there is no DeepSpeed for C++), with the names and
// defaults of Lightning's DeepSpeedStrategy (strategies/deepspeed/deepspeed.h).
// Sizes are in elements, as DeepSpeed counts them.
struct DeepSpeedOptions {
  // 1: optimizer state (and fp32 master weights) partitioned; 2: gradients too;
  // 3: parameters too (FSDP's FULL_SHARD machinery). Set by the strategy name.
  int stage = 2;
  // fp32 master weights and optimizer state in host memory (pinned on CUDA), the
  // step on the CPU; the device keeps parameters in their compute dtype.
  bool offload_optimizer = false;
  // Stage 3: parameter pieces at rest in host memory as well
  // (offload_param.device="cpu"). Not implemented on CUDA (an error); on a CPU
  // device they are there already.
  bool offload_parameters = false;
  // Elements all-gathered at once after the step (stages 1-2).
  int64_t allgather_bucket_size = 200000000;
  // Elements per gradient bucket reduced during backward.
  int64_t reduce_bucket_size = 200000000;
  // Reduce buckets while backward goes on (false: all at its end).
  bool overlap_comm = true;
  // Accepted for compatibility: gradients are always copied into contiguous buckets.
  bool contiguous_gradients = true;
  // Loss scaling under "16-mixed": loss_scale 0 is dynamic, starting at
  // 2**initial_scale_power and doubled after loss_scale_window clean steps; a
  // value > 0 is a static scale. hysteresis: overflows in a row before the scale
  // is lowered; min_loss_scale: the floor.
  double loss_scale = 0;
  int initial_scale_power = 16;
  int loss_scale_window = 1000;
  int hysteresis = 2;
  double min_loss_scale = 1;
  // A DeepSpeed JSON config file (ds_config.json); "" also reads the file named
  // by PL_DEEPSPEED_CONFIG_PATH when set. Its values replace the ones above
  // (strategies/deepspeed/config.h says which keys are read).
  std::string config;
  // What fabric.save writes: "full" (the file DDP writes) or "sharded" (a
  // torch.distributed.checkpoint directory in fsdp's layout: each rank writes
  // its pieces of the optimizer state, and at stage 3 of the parameters).
  std::string state_dict_type = "full";
  // Filled from the config's "gradient_clipping" (0: none): the norm the
  // strategy clips the gradients to before every optimizer step.
  double gradient_clipping = 0;
  // From the config's "train_micro_batch_size_per_gpu" (0: not given), for the
  // program's data loader: the strategy itself does not batch.
  int64_t train_micro_batch_size_per_gpu = 0;
};

}  // namespace fabric::strategies

namespace fabric::strategies {

// strategy="model_parallel": a 2-D mesh of data_parallel_size x
// tensor_parallel_size ranks, after Lightning's ModelParallelStrategy. Layers
// built from fabric::tp (strategies/model_parallel/tensor_parallel.h) split their
// weights across a tensor-parallel group; the data-parallel dimension runs
// `data_parallel` over the ranks that hold the same slices
// (strategies/model_parallel/model_parallel.h).
struct ModelParallelOptions {
  // 0 is Lightning's "auto": tensor_parallel_size = devices per node,
  // data_parallel_size = num_nodes. The product must be the world size.
  int64_t tensor_parallel_size = 0;
  int64_t data_parallel_size = 0;
  // The data-parallel dimension: "fsdp" (sharded with FabricOptions::fsdp's
  // options, as Lightning's TP + FSDP2) or "ddp" (replicated, with
  // FabricOptions::ddp's).
  std::string data_parallel = "fsdp";
  // What fabric.save writes: "full" (rank 0 writes the unsplit model's state
  // dict, the file single_device writes) or "sharded" (a
  // torch.distributed.checkpoint directory with the unsplit model's keys and
  // shapes, each rank writing its slices; it loads at any mesh).
  std::string state_dict_type = "full";
};

}  // namespace fabric::strategies
