// libFuzzer target: fabric::read_checkpoint (checkpoint/checkpoint.h) on a fuzzed
// file. The input is the whole file (a torch.save zip archive when it is a
// good one); it is written to a memfd and read through /proc/self/fd/N twice,
// once with ReadMode::kCopy and once with ReadMode::kMapped, so the zip
// parsing (LibTorch's PyTorchStreamReader), our pickle reader, the checks
// after it and the fallback to LibTorch's unpickler for torch.* classes are
// all reached. tests/fuzz/make_seeds.py writes seeds from real torch.save
// files.
//
// An exception (std::exception, c10::Error) is the correct answer to a bad
// input; a crash, abort, sanitizer report or timeout is a finding.
//
// Linked with tests/fuzz/sharded_stub.cpp in place of checkpoint/sharded_checkpoint.cpp
// (which pulls in the strategies): a memfd is never a directory, so the sharded
// path is never taken.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#include <c10/util/Exception.h>
// Complete before checkpoint/checkpoint.h, which clang needs (see scripts/fuzz.sh).
#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>

#include "checkpoint/checkpoint.h"

namespace {

// read_checkpoint warns (TORCH_WARN) for each Python object it reads as a
// placeholder; printing those for every input would swamp the fuzzer's output.
class QuietWarnings : public c10::WarningHandler {
 public:
  void process(const c10::Warning&) override {}
};

int file_fd() {
  static const int fd = ::memfd_create("checkpoint_fuzz", MFD_CLOEXEC);
  return fd;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  static QuietWarnings quiet;
  c10::WarningUtils::set_warning_handler(&quiet);
  if (file_fd() < 0) std::abort();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const int fd = file_fd();
  if (::ftruncate(fd, 0) != 0) std::abort();
  size_t done = 0;
  while (done < size) {
    const ssize_t n = ::pwrite(fd, data + done, size - done, static_cast<off_t>(done));
    if (n <= 0) std::abort();
    done += static_cast<size_t>(n);
  }
  const std::string path = "/proc/self/fd/" + std::to_string(fd);
  for (auto mode : {fabric::ReadMode::kCopy, fabric::ReadMode::kMapped}) {
    try {
      auto value = fabric::read_checkpoint(path, mode);
      (void)value;
    } catch (const c10::Error&) {
    } catch (const std::exception&) {
    }
  }
  return 0;
}
