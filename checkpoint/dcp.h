// Items of a torch.distributed.checkpoint (DCP) directory: each rank's
// `__<rank>_0.distcp` holds its items back to back, each one a complete
// torch.save archive (a tensor chunk, or a pickled value), and `.metadata`
// (dcp_metadata.h) says where each is. What Python's dcp.save writes, and what
// its dcp.load, format_utils.dcp_to_torch_save and Lightning read.
//
// Reading maps the files and copies only what is asked for: read_into reads
// just the chunks that overlap the region it fills, so a rank that holds a
// piece of a tensor never builds the whole.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>

#include "checkpoint/dcp_metadata.h"

namespace fabric {
class MappedFile;
}

namespace fabric::dcp {

// The metadata file's name, and the data file rank `rank` writes.
extern const char* const kMetadataFile;
std::string data_file(int64_t rank);

// The rectangular chunks, in order, whose row-major elements are exactly the
// flat elements [begin, end) of a tensor of `shape` (an FSDP flat piece): at
// most 2 * ndim - 1 of them (3 for a matrix). A scalar is one empty chunk.
std::vector<Chunk> chunks_of_range(const std::vector<int64_t>& shape, int64_t begin, int64_t end);

// Appends items to one data file. Items start 64-byte aligned, so readers view
// tensor data in the map without copying.
class ItemWriter {
 public:
  ItemWriter(const std::string& dir, const std::string& name);  // creates dir/name
  ~ItemWriter();
  ItemWriter(const ItemWriter&) = delete;
  ItemWriter& operator=(const ItemWriter&) = delete;
  // A tensor (its elements only, whatever storage it views) or a plain value.
  StorageInfo write(const c10::IValue& value);
  // Flushes to disk and closes; throws std::runtime_error naming the file.
  void close();

 private:
  void put(const char* data, size_t size);
  std::string path_, name_;
  int fd_ = -1;
  int64_t written_ = 0;
};

// A DCP directory, read lazily. Errors name the directory, the file and the
// problem (missing, truncated, not what the metadata says).
class Reader {
 public:
  explicit Reader(std::string dir);
  const Metadata& metadata() const { return metadata_; }
  bool has(const std::string& fqn) const { return metadata_.entries.count(fqn) > 0; }
  // The whole tensor stored under `fqn`.
  at::Tensor tensor(const std::string& fqn) const;
  // Fills `out` (a region of `fqn` starting at `offsets`, of out's sizes) from
  // the chunks that overlap it.
  void read_into(const std::string& fqn, const std::vector<int64_t>& offsets, at::Tensor& out) const;
  // Fills the 1-D `flat` with the flattened elements of `fqn` starting at
  // `flat_offset` (an FSDP flat piece), from the chunks that overlap it.
  void read_flat(const std::string& fqn, int64_t flat_offset, at::Tensor& flat) const;
  // A value stored as bytes (a hyper-parameter, a list of names).
  c10::IValue value(const std::string& fqn) const;
  // Every key, nested as it was saved (planner_data): the state dict itself.
  // `leaf`, when given, reads each key instead of the whole tensor or value.
  using Leaf = std::function<c10::IValue(const std::string& fqn, const Entry& entry)>;
  c10::IValue state_dict(const Leaf& leaf = nullptr) const;

 private:
  c10::IValue item(const std::string& fqn, const StorageInfo& where) const;
  std::string dir_;
  Metadata metadata_;
  mutable std::map<std::string, std::shared_ptr<const MappedFile>> files_;
};

}  // namespace fabric::dcp
