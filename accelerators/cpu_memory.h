// How freed host memory goes back to the system, for training loops on the CPU.
//
// glibc's malloc, left alone, hands the top of its heap back to the kernel as soon
// as more than twice the largest recently freed block is free there. A training
// step frees its activations and gradients at the end, so the next step gets the
// same memory back as fresh pages and faults every one of them in again: on the GPT
// example's CPU step (batch 8) about 500 page faults a step, some 4% of its time.
// Fabric therefore asks malloc to keep freed memory for reuse (as PyTorch's CUDA
// caching allocator does for GPU memory): blocks up to 32 MiB come from the heap
// (glibc's largest setting) and up to 1 GiB of free heap (per malloc arena) stays
// mapped. The resident memory of the process then stays near its peak instead of
// shrinking between steps. FabricOptions::retain_cpu_memory = false leaves
// malloc's defaults alone; once applied, the setting lasts for the process (a
// later Fabric with false does not undo it).
#pragma once

namespace fabric::accelerators {

// Applies the settings above to this process (idempotent). Returns false, changing
// nothing, where the program is not built against glibc or where the user chose
// for themselves by setting MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_,
// MALLOC_TOP_PAD_ or glibc.malloc tunables in GLIBC_TUNABLES. (A malloc replaced
// through LD_PRELOAD, jemalloc or tcmalloc, ignores the call; they keep freed
// memory by themselves.)
bool retain_freed_cpu_memory();

// Whether retain_freed_cpu_memory() has applied its settings in this process.
bool freed_cpu_memory_retained();

}  // namespace fabric::accelerators
