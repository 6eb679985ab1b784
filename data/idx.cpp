#include "data/idx.h"

#include <zlib.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <sys/stat.h>
#include <vector>

#include <ATen/ops/empty.h>

namespace fabric::data {
namespace {

struct GzCloser {
  void operator()(gzFile_s* file) const { gzclose(file); }
};

// Reads exactly `size` bytes or throws, naming what was being read.
void read_exact(gzFile file, void* out, size_t size, const std::string& path, const char* what) {
  auto* dst = static_cast<unsigned char*>(out);
  size_t done = 0;
  while (done < size) {
    const unsigned chunk = static_cast<unsigned>(std::min<size_t>(size - done, 1u << 30));
    const int got = gzread(file, dst + done, chunk);
    if (got < 0) {
      int err = 0;
      const char* message = gzerror(file, &err);
      throw std::runtime_error("IDX file " + path + ": read error in " + what + ": " +
                               (message ? message : "unknown"));
    }
    if (got == 0) {
      throw std::runtime_error("IDX file " + path + " is truncated: expected " +
                               std::to_string(size) + " bytes of " + what + ", got " +
                               std::to_string(done));
    }
    done += static_cast<size_t>(got);
  }
}

uint32_t big_endian(const unsigned char* bytes) {
  return (uint32_t(bytes[0]) << 24) | (uint32_t(bytes[1]) << 16) | (uint32_t(bytes[2]) << 8) |
         uint32_t(bytes[3]);
}

}  // namespace

at::Tensor read_idx(const std::string& path) {
  struct stat info {};
  if (::stat(path.c_str(), &info) != 0) {
    throw std::runtime_error("IDX file not found: " + path);
  }
  std::unique_ptr<gzFile_s, GzCloser> file(gzopen(path.c_str(), "rb"));
  if (!file) throw std::runtime_error("cannot open IDX file " + path);
  unsigned char header[4];
  read_exact(file.get(), header, 4, path, "the header");
  if (header[0] != 0 || header[1] != 0) {
    throw std::runtime_error("file " + path + " is not an IDX file (bad magic number)");
  }
  if (header[2] != 0x08) {
    throw std::runtime_error("IDX file " + path + " holds data type 0x" +
                             std::to_string(int(header[2])) +
                             "; only unsigned bytes (0x08) are supported");
  }
  const int ndim = header[3];
  if (ndim < 1 || ndim > 8) {
    throw std::runtime_error("IDX file " + path + " declares " + std::to_string(ndim) +
                             " dimensions; expected 1..8");
  }
  std::vector<int64_t> sizes(ndim);
  int64_t numel = 1;
  for (int i = 0; i < ndim; ++i) {
    unsigned char bytes[4];
    read_exact(file.get(), bytes, 4, path, "the dimension sizes");
    sizes[i] = big_endian(bytes);
    numel *= sizes[i];
  }
  at::Tensor out = at::empty(sizes, at::TensorOptions().dtype(at::kByte));
  read_exact(file.get(), out.data_ptr<uint8_t>(), static_cast<size_t>(numel), path, "data");
  unsigned char extra;
  if (gzread(file.get(), &extra, 1) > 0) {
    throw std::runtime_error("IDX file " + path + " has data past the declared " +
                             std::to_string(numel) + " bytes");
  }
  return out;
}

}  // namespace fabric::data
