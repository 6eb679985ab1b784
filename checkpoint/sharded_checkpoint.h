// Sharded checkpoints: what fabric.save writes under fsdp with
// state_dict_type="sharded". A directory holding
//   shard_<rank>.pt   per rank: the checkpoint dict as that rank holds it between
//                     steps (each sharded parameter and its per-element optimizer
//                     state as this rank's flat piece; everything else whole)
//   metadata.pt       written last by rank 0: the world size and, for every
//                     sharded tensor, its key path and full shape
// Each file is the same zip/pickle format as a full checkpoint (Python's
// torch.load reads it). The pieces of a tensor concatenate, in rank order, to the
// flattened tensor, so reading at any world size (and under any strategy) is
// concatenation: fabric.load(dir, state) accepts such a directory wherever it
// accepts a file, and consolidate_checkpoint writes it as one full file.
//
// Atomic and durable like every save: ranks write into `<dir>.partial`, and only
// when every rank has succeeded does rank 0 add the metadata and swap it with
// `<dir>` in one step (renameat2 RENAME_EXCHANGE; the parent directory is synced
// before the previous copy is removed), so an interruption at any point leaves a
// complete checkpoint at `<dir>`: the previous one or the new one. Filesystems
// without the exchange get two renames through `<dir>.old`; an interruption
// between them leaves `<dir>` missing, and loads (and the next save) then take
// the newest complete copy (`<dir>.partial`, else `<dir>.old`). The directory
// must be on a filesystem every rank sees (one node, or a shared one).
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
  // The full shape of a parameter this rank holds only a flat piece of (the
  // pieces of all ranks, in rank order, concatenate to the flattened
  // parameter); nullopt for one held whole.
  std::function<std::optional<std::vector<int64_t>>(const at::Tensor&)> full_shape;
  // Called by every rank at the same points: whether any rank failed.
  std::function<bool(bool failed_here)> any_rank_failed;
};

// Every rank calls it (between steps); every rank throws if any rank failed.
void save_sharded_checkpoint(const std::string& dir, const State& state, const ShardedJob& job);
// Whether `path` is a directory holding a sharded checkpoint's metadata (or,
// while `path` is missing, an interrupted save left a complete copy beside it).
bool is_sharded_checkpoint(const std::string& path);
// The full checkpoint dict of a sharded directory (what a full save would have
// written); errors name the missing or damaged file.
c10::IValue read_sharded_checkpoint(const std::string& dir);
// Writes a sharded directory as one full checkpoint file (atomically).
void consolidate_checkpoint(const std::string& dir, const std::string& file);

}  // namespace fabric
