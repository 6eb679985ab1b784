// Sharded checkpoints: what fabric.save writes under fsdp with
// state_dict_type="sharded". A torch.distributed.checkpoint (DCP) directory in
// Lightning's layout, so that Python's dcp.load, dcp_to_torch_save and
// Lightning's fabric.load read it, and the reverse:
//   __<rank>_0.distcp  per rank: its items (checkpoint/dcp.h): every sharded
//                      parameter's flat piece as up to 2*ndim-1 rectangular
//                      chunks, and its per-element optimizer state likewise;
//                      rank 0 also writes what every rank holds whole
//   .metadata          written last by rank 0: every key, its dtype, size and
//                      chunks, and where each item lies (dcp_metadata.h)
//   meta.pt            everything that is not a module or an optimizer (torch.save)
// Keys are Lightning's: "model.<param>", "optimizer.state.<param>.exp_avg",
// "optimizer.param_groups.0.lr" (optimizer state keyed by parameter name, as
// FSDP's optim_state_dict keys it). Reading accepts any DCP directory (meta.pt
// optional: a plain dcp.save has none) at any world size, and the earlier
// torchfabric layout (shard_<rank>.pt + metadata.pt), read-only.
//
#pragma once

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <ATen/core/ivalue.h>

#include "checkpoint/checkpoint.h"

namespace fabric {

// What a sharded save needs from the job it runs in (Fabric passes its
// strategy's answers; this layer is below the strategies).
struct ShardedJob {
  int64_t rank = 0;
  int64_t world_size = 1;
  // Where a parameter this rank holds only a flat piece of lies in the whole:
  // its full shape and the piece's first element in the flattened parameter;
  // nullopt for one held whole.
  struct Shard {
    std::vector<int64_t> full_shape;
    int64_t flat_offset = 0;
    // When not empty, instead of flat_offset: the rank's data, flattened, is
    // these ranges {first element, count} of the flattened whole, one after
    // the other (a tensor-parallel slice: one range per contiguous run).
    std::vector<std::pair<int64_t, int64_t>> ranges;
    // Whether this rank writes its data: false for a piece other ranks hold
    // the same copy of (one of them writes it).
    bool owner = true;
  };
  std::function<std::optional<Shard>(const at::Tensor&)> shard_of;
  // The module parameter an optimizer's tensor stands for, when the optimizer
  // steps stand-ins (ZeRO's pieces): its state is keyed by that parameter's
  // name. Undefined (or no function): the tensor is a module parameter itself.
  std::function<at::Tensor(const at::Tensor&)> stands_for;
  // Called by every rank at the same points: whether any rank failed.
  std::function<bool(bool failed_here)> any_rank_failed;
};

// Every rank calls it (between steps); every rank throws if any rank failed.
void save_sharded_checkpoint(const std::string& dir, const State& state, const ShardedJob& job);
// Whether `path` is a directory holding a sharded checkpoint's metadata (DCP's
// .metadata, or the earlier layout's metadata.pt) (or,
// while `path` is missing, an interrupted save left a complete copy beside it).
bool is_sharded_checkpoint(const std::string& path);
// The full checkpoint dict of a sharded directory (what a full save would have
// written); errors name the missing or damaged file.
c10::IValue read_sharded_checkpoint(const std::string& dir);
// Whether `path` is a (complete) distributed-checkpoint directory, ours or Python's.
bool is_distributed_checkpoint(const std::string& path);
// The checkpoint dict of a distributed-checkpoint directory as this rank needs
// it: each sharded parameter of `state` (shard_of answers as in ShardedJob) and
// its per-element optimizer state read as just this rank's flat piece, from
// the chunks that overlap it; everything else whole. No rank builds the full
// state. nullopt when nothing in `state` is sharded (or an optimizer holds a
// sharded parameter no module of `state` names): read it whole instead.
std::optional<c10::IValue> read_sharded_pieces(
    const std::string& path, const State& state,
    const std::function<std::optional<ShardedJob::Shard>(const at::Tensor&)>& shard_of,
    const std::function<at::Tensor(const at::Tensor&)>& stands_for = {});
// Writes a sharded directory (ours or Python's) as one full checkpoint file
// (atomically): what a full save writes, optimizer state numbered as
// torch.optim numbers it (a distributed checkpoint keys it by parameter name).
void consolidate_checkpoint(const std::string& dir, const std::string& file);

}  // namespace fabric
