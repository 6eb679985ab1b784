// Creating the c10d process group of a multi-process strategy.
//
// Rendezvous: rank 0 hosts LibTorch's c10d TCPStore at master_addr:master_port
// (loopback for a single-node job); every rank checks in and waits for all others
// until `timeout`, so a rank that never joins fails the job with a message naming
// the missing ranks instead of hanging. Under mpirun with no MASTER_ADDR: on one
// node the store is on loopback at a port derived from the mpirun job id (20000 +
// id % 30000; MASTER_PORT overrides), and the rendezvous happens before MPI_Init,
// which would otherwise wait forever for a missing rank; across nodes rank 0
// broadcasts its address and a free port with MPI (a rank that never starts then
// blocks MPI_Init, which mpirun's own supervision has to end).
//
// Backends: "mpi" (Open MPI, CPU tensors; needs an MPI launcher), "nccl" (CUDA
// tensors, LibTorch's ProcessGroupNCCL). "gloo" is not available: pip's LibTorch
// ships ProcessGroupGloo.hpp but not Gloo's own headers, so it cannot be compiled
// against; asking for it is an error that says so.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include <c10/core/Device.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

namespace fabric::strategies {

struct ProcessGroupOptions {
  std::string backend;  // "mpi" or "nccl"
  int64_t rank = 0;
  int64_t world_size = 1;
  std::string master_addr;  // empty: MASTER_ADDR, or (under mpirun) broadcast by rank 0
  int master_port = 0;      // 0: MASTER_PORT, or a free port chosen by rank 0 under mpirun
  std::chrono::milliseconds timeout = std::chrono::minutes(30);
  c10::Device device = c10::Device(c10::DeviceType::CPU);
};

// Backends this build can create, for messages and option validation.
std::vector<std::string> available_backends();
// The default backend for a device type: nccl for CUDA, mpi for CPU.
std::string default_backend(c10::DeviceType device_type);
// Throws std::invalid_argument when `backend` cannot serve `device_type` or is not
// built, naming the valid choices.
void check_backend(const std::string& backend, c10::DeviceType device_type);

struct ProcessGroupHandle {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroup> group;
};

// Rendezvous, then the process group; throws std::runtime_error on timeout.
ProcessGroupHandle create_process_group(const ProcessGroupOptions& options);

}  // namespace fabric::strategies
