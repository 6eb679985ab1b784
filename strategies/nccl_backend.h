// LibTorch's ProcessGroupNCCL, created from C++. Kept in its own file because its
// header needs the CUDA toolkit's headers and USE_C10D_NCCL.
#pragma once

#include <chrono>

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

namespace fabric::strategies {

// Whether this build has the NCCL backend (it always does: pip's LibTorch is a CUDA build).
bool nccl_available();
// `collective_timeout` is the watchdog's: a collective not done in time tears the
// process down (TORCH_NCCL_ASYNC_ERROR_HANDLING=3 unless set) with a message naming
// it and its sequence number (TORCH_NCCL_DESYNC_DEBUG=1 has it name the ranks); 0: off.
c10::intrusive_ptr<c10d::Backend> make_nccl_backend(c10::intrusive_ptr<c10d::Store> store,
                                                    int rank, int size,
                                                    std::chrono::milliseconds collective_timeout);
// Makes `index` the current CUDA device of this process (before NCCL init).
void set_cuda_device(int index);

}  // namespace fabric::strategies
