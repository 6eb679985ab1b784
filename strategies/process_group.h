// Creating the c10d process group of a multi-process strategy.
//
// Rendezvous: rank 0 hosts LibTorch's c10d TCPStore at master_addr:master_port
// (loopback for a single-node job); every rank checks in and waits for all others
// until `timeout`, so a rank that never joins fails the job with a message naming
// the missing ranks instead of hanging. Under mpirun on one node the store is on
// loopback (or MASTER_ADDR) at a port derived from the mpirun job id
// (job_rendezvous_port; MASTER_PORT overrides), and the rendezvous happens before MPI_Init,
// which would otherwise wait forever for a missing rank. Across nodes (under
// mpirun) the store listens on every interface of rank 0's node at MASTER_PORT, or
// a free port that rank 0 broadcasts with MPI; with MASTER_ADDR the others connect
// there, without it rank 0 broadcasts its IPv4 interface addresses (not loopback)
// and its host name, and each rank tries them in turn (those on its own subnets
// first, a few seconds each) so that nodes whose names do not resolve still meet.
// When none answers within a minute (or `timeout`, if shorter) the rank fails
// naming every address tried and MASTER_ADDR, and the others fail with it. A rank that never starts blocks
// MPI_Init there, which mpirun's own supervision has to end.
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
  int master_port = 0;      // 0: MASTER_PORT, or (under mpirun) the job-id port on one
                            // node, a free port broadcast by rank 0 across nodes
  std::chrono::milliseconds timeout = std::chrono::minutes(30);  // rendezvous
  // Stall detection (0: off): mpi's CollectiveWatchdog, nccl's own watchdog.
  std::chrono::milliseconds collective_timeout = std::chrono::minutes(10);
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

// The store's port for a one-node mpirun job `job_id`, outside this machine's
// ephemeral port range (net.ipv4.ip_local_port_range, passed in): a port inside
// it can be taken by a rank's own connect() while it retries before rank 0
// listens (a TCP self-connect, which would hang the rank on its own bytes), or
// by any outgoing connection on the machine. Ports below the range's start from
// 10000 when at least 1000 are there, else above its end, else 20000 + id % 30000.
int job_rendezvous_port(long job_id, int ephemeral_low = 32768, int ephemeral_high = 60999);

// Rendezvous, then the process group; throws std::runtime_error on timeout.
ProcessGroupHandle create_process_group(const ProcessGroupOptions& options);

// A group of some of the world's ranks (a row or a column of a device mesh):
// every rank of `world` calls it, in the same order, with the `color` of the
// group it joins, its `rank` in it and the group's `size`. Under mpi, a split of
// the world's communicator; under nccl, a ProcessGroupNCCL of those ranks that
// meets through the world's store under "torchfabric/<name>/<color>". `options`
// is the world's (backend, device, collective timeout).
ProcessGroupHandle create_sub_group(const ProcessGroupHandle& world,
                                    const ProcessGroupOptions& options, const std::string& name,
                                    int color, int rank, int size);

}  // namespace fabric::strategies
