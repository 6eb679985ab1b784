// Options of the multi-process strategies, in their own structs (FabricOptions
// holds one of each, as `ddp` and `fsdp`). Plain data, no LibTorch headers, so
// fabric/options.h can include it cheaply.
#pragma once

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

// strategy="fsdp": fully sharded data parallel, after Lightning's FSDPStrategy.
// Every set-up module is one sharding unit (per dtype): its parameters, their
// gradients and the optimizer state live as 1/world_size shards between steps;
// the full parameters exist from the start of a training forward until its
// backward has reduce-scattered the gradients (see strategies/fsdp.h).
struct FSDPOptions {
  // "FULL_SHARD" (ZeRO-3: parameters, gradients and optimizer state sharded),
  // "SHARD_GRAD_OP" (ZeRO-2; with one unit per module it behaves as FULL_SHARD),
  // "NO_SHARD" (DDP's semantics: everything replicated, gradients all-reduced).
  std::string sharding_strategy = "FULL_SHARD";
  // What fabric.save writes: "full" (rank 0 writes the same file DDP writes).
  // "sharded" (a file per rank) is named but not available yet: an error says so.
  std::string state_dict_type = "full";
};

}  // namespace fabric::strategies
