#ifndef USE_C10D_NCCL
#define USE_C10D_NCCL
#endif
#include "strategies/nccl_backend.h"

#include <cstdlib>

#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

namespace fabric::strategies {

bool nccl_available() { return true; }

c10::intrusive_ptr<c10d::Backend> make_nccl_backend(c10::intrusive_ptr<c10d::Store> store,
                                                    int rank, int size,
                                                    std::chrono::milliseconds collective_timeout) {
  // 3: on a timeout or an NCCL error the watchdog ends the process (no cleanup,
  // which could hang on the broken communicator); its launcher ends the rest.
  ::setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3", /*overwrite=*/0);
  auto options = c10d::ProcessGroupNCCL::Options::create();
  // "Off" is a year: the watchdog still reports NCCL's own errors.
  options->timeout = collective_timeout.count() > 0 ? collective_timeout : std::chrono::hours(24 * 365);
  return c10::make_intrusive<c10d::ProcessGroupNCCL>(std::move(store), rank, size, options);
}

void set_cuda_device(int index) { c10::cuda::set_device(static_cast<c10::DeviceIndex>(index)); }

}  // namespace fabric::strategies
