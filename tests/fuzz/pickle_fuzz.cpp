// libFuzzer target: fabric::read_pickle_archive (checkpoint/pickle_reader.h) on a
// fuzzed data.pkl. The input is
//
//   [data.pkl bytes] [u32 LE size of data/0] ... [u32 LE size of data/n-1] [flags]
//
// flags (the last byte): bits 0-4 = n, the number of storage records data/0 ..
// data/n-1 to put beside data.pkl (each size taken modulo 64 KiB, filled with a
// fixed pattern); bit 7 = read through a MappedFile (the tensors view the
// archive's map, as read_checkpoint(path, ReadMode::kMapped) does) instead of
// copying records. An input too short for its trailer has no records. The
// archive is written with LibTorch's PyTorchStreamWriter in memory, so the bytes
// reach the unpickler at once instead of having to survive the zip parser first
// (checkpoint_fuzz.cpp fuzzes whole files). tests/fuzz/make_seeds.py writes
// seeds in this layout from real torch.save files.
//
// An exception (std::exception, c10::Error) is the correct answer to a bad
// input; a crash, abort, sanitizer report or timeout is a finding.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <istream>
#include <sstream>
#include <string>
#include <vector>

#include <c10/util/Exception.h>
#include <caffe2/serialize/inline_container.h>

#include "checkpoint/mapped_file.h"
#include "checkpoint/pickle_reader.h"

namespace {

constexpr size_t kMaxRecord = 64 << 10;

int archive_fd() {
  static const int fd = ::memfd_create("pickle_fuzz", MFD_CLOEXEC);
  return fd;
}

void write_all(int fd, const std::string& bytes) {
  if (::ftruncate(fd, 0) != 0) std::abort();
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::pwrite(fd, bytes.data() + done, bytes.size() - done, static_cast<off_t>(done));
    if (n <= 0) std::abort();
    done += static_cast<size_t>(n);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  size_t pickle_size = size;
  size_t records = 0;
  bool mapped = false;
  std::vector<size_t> record_sizes;
  if (size >= 1) {
    const uint8_t flags = data[size - 1];
    records = flags & 0x1f;
    mapped = (flags & 0x80) != 0;
    if (size >= 1 + 4 * records) {
      pickle_size = size - 1 - 4 * records;
      for (size_t i = 0; i < records; ++i) {
        uint32_t n = 0;
        std::memcpy(&n, data + pickle_size + 4 * i, 4);
        record_sizes.push_back(n % kMaxRecord);
      }
    } else {
      records = 0;
    }
  }

  std::string archive;
  {
    caffe2::serialize::PyTorchStreamWriter writer([&](const void* buf, size_t n) {
      archive.append(static_cast<const char*>(buf), n);
      return n;
    });
    writer.writeRecord("data.pkl", data, pickle_size);
    std::vector<char> fill;
    for (size_t i = 0; i < record_sizes.size(); ++i) {
      fill.resize(record_sizes[i]);
      for (size_t j = 0; j < fill.size(); ++j) fill[j] = static_cast<char>(j * 7 + i);
      writer.writeRecord("data/" + std::to_string(i), fill.data(), fill.size());
    }
    writer.writeEndOfFile();
  }

  std::shared_ptr<const fabric::MappedFile> file;
  if (mapped) {
    write_all(archive_fd(), archive);
    file = fabric::MappedFile::open("/proc/self/fd/" + std::to_string(archive_fd()));
  }
  std::istringstream in(archive);
  caffe2::serialize::PyTorchStreamReader reader(&in);
  std::vector<std::string> notes;
  try {
    auto value = fabric::read_pickle_archive(reader, "fuzz", &notes, file);
    (void)value;
  } catch (const c10::Error&) {
  } catch (const std::exception&) {
  }
  return 0;
}
