// Reader for the IDX format of MNIST and Fashion-MNIST (optionally gzip-compressed):
// a big-endian header {0, 0, type, ndim}, ndim big-endian uint32 sizes, then the
// data. Only unsigned-byte data (type 0x08), which both datasets use, is supported.
#pragma once

#include <string>

#include <ATen/core/Tensor.h>

namespace fabric::data {

// Returns a uint8 tensor of the file's shape. Throws std::runtime_error naming the
// path for a missing file, a bad magic number or truncated data.
at::Tensor read_idx(const std::string& path);

}  // namespace fabric::data
