#include "checkpoint/mapped_file.h"

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <fcntl.h>
#include <stdexcept>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <ATen/ops/empty.h>
#include <c10/core/Storage.h>

namespace fabric {
namespace {

void release(void* context) { delete static_cast<std::shared_ptr<const MappedFile>*>(context); }

}  // namespace

std::shared_ptr<const MappedFile> MappedFile::open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw std::runtime_error("cannot open " + path + ": " + std::strerror(errno));
  struct stat info {};
  if (::fstat(fd, &info) != 0) {
    const int error = errno;
    ::close(fd);
    throw std::runtime_error("cannot stat " + path + ": " + std::strerror(error));
  }
  const size_t size = static_cast<size_t>(info.st_size);
  void* data = size == 0 ? nullptr : ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  const int error = errno;
  ::close(fd);  // the map keeps the file
  if (data == MAP_FAILED) throw std::runtime_error("cannot map " + path + ": " + std::strerror(error));
  if (data) ::madvise(data, size, MADV_SEQUENTIAL);
  std::shared_ptr<const MappedFile> file(new MappedFile(static_cast<const char*>(data), size));
  file->self_ = file;
  return file;
}

MappedFile::~MappedFile() {
  if (data_ && !parent_) ::munmap(const_cast<char*>(data_), size_);
}

std::shared_ptr<const MappedFile> MappedFile::slice(size_t offset, size_t length) const {
  if (offset > size_ || length > size_ - offset) {
    throw std::invalid_argument("MappedFile::slice: bytes outside the file");
  }
  std::shared_ptr<const MappedFile> part(new MappedFile(data_ + offset, length, self_.lock()));
  part->self_ = part;
  return part;
}

at::Tensor MappedFile::tensor(size_t offset, int64_t numel, c10::ScalarType dtype) const {
  const size_t item = c10::elementSize(dtype);
  const size_t nbytes = static_cast<size_t>(numel) * item;
  if (numel < 0 || offset > size_ || nbytes / item != static_cast<size_t>(numel) ||
      nbytes > size_ - offset || reinterpret_cast<uintptr_t>(data_ + offset) % item != 0) {
    throw std::invalid_argument("MappedFile::tensor: bytes outside the file or misaligned");
  }
  char* begin = const_cast<char*>(data_) + offset;
  auto* keep = new std::shared_ptr<const MappedFile>(self_.lock());
  c10::Storage storage(c10::Storage::use_byte_size_t(), nbytes,
                       at::DataPtr(begin, keep, &release, c10::Device(c10::DeviceType::CPU)),
                       /*allocator=*/nullptr, /*resizable=*/false);
  at::Tensor t = at::empty({0}, at::TensorOptions().dtype(dtype));
  t.set_(storage, 0, {numel}, {1});
  return t;
}

}  // namespace fabric
