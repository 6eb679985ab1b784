// LibTorch's ProcessGroupNCCL, created from C++. Kept in its own file because its
// header needs the CUDA toolkit's headers and USE_C10D_NCCL.
#pragma once

#include <chrono>

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

namespace fabric::strategies {

// Whether this build has the NCCL backend (it always does: pip's LibTorch is a CUDA build).
bool nccl_available();
c10::intrusive_ptr<c10d::Backend> make_nccl_backend(c10::intrusive_ptr<c10d::Store> store,
                                                    int rank, int size,
                                                    std::chrono::milliseconds timeout);
// Makes `index` the current CUDA device of this process (before NCCL init).
void set_cuda_device(int index);

}  // namespace fabric::strategies
