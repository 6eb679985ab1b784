// The `.metadata` file of a torch.distributed.checkpoint (DCP) directory: a
// plain pickle of torch.distributed.checkpoint.metadata.Metadata that names,
// for every flattened key ("model.fc.weight", "optimizer.state.fc.weight.exp_avg",
// "optimizer.param_groups.0.lr"), what it is (a tensor of this dtype and size,
// stored as these rectangular chunks; or a pickled Python value) and where each
// item lies (file, byte offset, length).
//
// Why our own writer: Python's pickle.load must rebuild the very dataclasses
// PyTorch's reader expects (Metadata, TensorStorageMetadata, MetadataIndex,
// _StorageInfo...), which no LibTorch pickler writes. The reader is
// checkpoint/pickle_reader.h (every length checked), so a damaged or forged
// file is an error naming it, never a crash.
#pragma once

#include <map>
#include <optional>
#include <string>
#include <vector>

#include <ATen/core/ivalue.h>
#include <c10/core/ScalarType.h>

namespace fabric::dcp {

// The DCP format version this reads and writes (torch 2.4 to 2.11 write
// "1.0.0"; older ones wrote none, which reads as the same).
extern const char* const kVersion;

// A rectangular piece of a tensor: where it starts, how large it is.
struct Chunk {
  std::vector<int64_t> offsets, sizes;
  int64_t numel() const;
};

// Where one stored item is.
struct StorageInfo {
  std::string relative_path;  // "__0_0.distcp"
  int64_t offset = 0, length = 0;
};

// One flattened key.
struct Entry {
  bool tensor = true;  // false: a pickled value (BytesStorageMetadata)
  c10::ScalarType dtype = c10::kFloat;
  bool requires_grad = false;
  std::vector<int64_t> size;
  std::vector<Chunk> chunks;
  // Where each chunk's item is (same order as chunks); for a value, one item.
  std::vector<StorageInfo> storage;
};

struct Metadata {
  std::map<std::string, Entry> entries;
  // Each key's place in the nested state dict (strings for dict keys, ints for
  // list indices): DCP's flatten mapping, used to rebuild the nesting.
  std::map<std::string, std::vector<c10::IValue>> planner_data;
};

// The pickle Python's pickle.load turns into that Metadata (protocol 2).
std::vector<char> write_metadata(const Metadata& metadata);
// Parses a `.metadata` file's bytes; `what` names the file in errors (a
// malformed pickle, a class or version this does not know, a storage item
// that no key or chunk owns, chunks that do not cover their tensor). whole =
// false: one rank's part of a save (its chunks alone need not cover).
Metadata read_metadata(const char* data, size_t size, const std::string& what, bool whole = true);

// Python's name of a dtype ("float32") and back (nullopt: not one DCP stores).
std::string dtype_name(c10::ScalarType dtype);
std::optional<c10::ScalarType> dtype_from_name(const std::string& name);

}  // namespace fabric::dcp
