// A read-only view of a whole file through a private memory map, shared by the
// tensors that look into it (the map lives until the last of them is gone).
//
// Why: loading a checkpoint into a model copies each tensor into its parameter;
// reading the file through a map instead of into freshly allocated buffers means
// the load holds one copy of the weights (the model's) plus reclaimable page
// cache, not two. Private (copy-on-write) pages keep writes to such a tensor out
// of the file. A file truncated in place while mapped faults on access, so the
// loaders copy whatever they hand back to the caller.
#pragma once

#include <cstddef>
#include <memory>
#include <string>

#include <ATen/core/Tensor.h>

namespace fabric {

class MappedFile {
 public:
  // Maps `path`; throws std::runtime_error naming it and the OS error.
  static std::shared_ptr<const MappedFile> open(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  // The bytes [offset, offset + length) as a file of their own, sharing this
  // map (an item inside a larger file: a distributed checkpoint's .distcp).
  std::shared_ptr<const MappedFile> slice(size_t offset, size_t length) const;

  const char* data() const { return data_; }
  size_t size() const { return size_; }
  // A 1-D tensor of `numel` elements of `dtype` over bytes [offset, offset + numel
  // * itemsize), keeping the map alive. The range must lie inside the file and
  // be aligned (in memory) for the dtype.
  at::Tensor tensor(size_t offset, int64_t numel, c10::ScalarType dtype) const;

 private:
  MappedFile(const char* data, size_t size, std::shared_ptr<const MappedFile> parent = nullptr)
      : data_(data), size_(size), parent_(std::move(parent)) {}
  const char* data_;
  size_t size_;
  std::shared_ptr<const MappedFile> parent_;  // a slice keeps the whole map; only the whole unmaps
  mutable std::weak_ptr<const MappedFile> self_;
};

}  // namespace fabric
