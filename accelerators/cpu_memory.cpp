#include "accelerators/cpu_memory.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace fabric::accelerators {
namespace {
std::atomic<bool> retained{false};
}  // namespace

bool retain_freed_cpu_memory() {
#if defined(__GLIBC__)
  for (const char* name : {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"}) {
    if (std::getenv(name) != nullptr) return false;  // the user's own malloc tuning wins
  }
  if (const char* tunables = std::getenv("GLIBC_TUNABLES");
      tunables != nullptr && std::strstr(tunables, "glibc.malloc.") != nullptr) {
    return false;
  }
  if (retained.load()) return true;
  // Both or neither: a fixed trim threshold alone switches off glibc's adaptive
  // mmap threshold, and every block over 128 KiB would be mmapped afresh. So the
  // mmap threshold first (it is the one that can be refused); the trim threshold
  // takes any value.
  constexpr int kMmapThreshold = 32 << 20;  // glibc's maximum on 64-bit systems
  constexpr int kTrimThreshold = 1 << 30;
  if (mallopt(M_MMAP_THRESHOLD, kMmapThreshold) != 1) return false;
  if (mallopt(M_TRIM_THRESHOLD, kTrimThreshold) != 1) return false;
  retained.store(true);
  return true;
#else
  return false;
#endif
}

bool freed_cpu_memory_retained() { return retained.load(); }

}  // namespace fabric::accelerators
