#include "strategies/process_group.h"

// C API only: the deprecated MPI C++ bindings need libmpi_cxx.
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>

#include <algorithm>
#include <cstdlib>
#include <stdexcept>
#include <thread>
#include <unistd.h>

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "util/quoted_list.h"
#include "strategies/mpi_backend.h"
#include "strategies/nccl_backend.h"

namespace fabric::strategies {
namespace {

std::string env_or(const char* name, const std::string& fallback) {
  const char* value = std::getenv(name);
  return (value && *value) ? value : fallback;
}

// This host's name as other nodes can reach it (for an address broadcast under MPI).
std::string host_address() {
  char name[256] = {0};
  if (::gethostname(name, sizeof(name) - 1) != 0) return "127.0.0.1";
  return name;
}

// Under mpirun: rank 0's store address and port, sent to everyone with MPI.
void broadcast_address(std::string& addr, int& port, int64_t rank) {
  mpi_world();
  char buffer[256] = {0};
  if (rank == 0) {
    std::snprintf(buffer, sizeof(buffer), "%s", addr.c_str());
  }
  int value = port;
  MPI_Bcast(buffer, sizeof(buffer), MPI_CHAR, 0, MPI_COMM_WORLD);
  MPI_Bcast(&value, 1, MPI_INT, 0, MPI_COMM_WORLD);
  addr = buffer;
  port = value;
}

// Every rank checks in; each waits for all the others until the timeout.
void check_in(c10d::Store& store, int64_t rank, int64_t world_size,
              std::chrono::milliseconds timeout, const std::string& where) {
  store.set("rank/" + std::to_string(rank), std::vector<uint8_t>{1});
  std::vector<std::string> keys;
  for (int64_t r = 0; r < world_size; ++r) keys.push_back("rank/" + std::to_string(r));
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!store.check(keys)) {
    if (std::chrono::steady_clock::now() >= deadline) {
      std::string missing;
      for (int64_t r = 0; r < world_size; ++r) {
        if (!store.check({keys[r]})) missing += (missing.empty() ? "" : ", ") + std::to_string(r);
      }
      throw std::runtime_error(
          "rendezvous at " + where + " timed out after " +
          std::to_string(timeout.count() / 1000.0) + " s: rank(s) " + missing + " of " +
          std::to_string(world_size) + " never joined. Check that every rank was started and "
          "reaches fabric.launch(), or raise the timeout");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

}  // namespace

std::vector<std::string> available_backends() {
  std::vector<std::string> out = {"mpi"};
  if (nccl_available()) out.push_back("nccl");
  return out;
}

std::string default_backend(c10::DeviceType device_type) {
  return device_type == c10::DeviceType::CUDA ? "nccl" : "mpi";
}

void check_backend(const std::string& backend, c10::DeviceType device_type) {
  const std::string valid = "valid backends in this build: " + quoted_list(available_backends());
  if (backend == "gloo") {
    throw std::invalid_argument(
        "process_group_backend='gloo' is not available: pip's LibTorch ships no Gloo headers, "
        "so torchfabric cannot build ProcessGroupGloo; " + valid +
        " (mpi for CPU tensors, nccl for CUDA)");
  }
  if (backend == "mpi") {
    if (device_type != c10::DeviceType::CPU) {
      throw std::invalid_argument(
          "process_group_backend='mpi' handles CPU tensors only; use 'nccl' with "
          "accelerator='cuda'");
    }
    return;
  }
  if (backend == "nccl") {
    if (device_type != c10::DeviceType::CUDA) {
      throw std::invalid_argument(
          "process_group_backend='nccl' needs accelerator='cuda'; use 'mpi' on the CPU");
    }
    if (!nccl_available()) {
      throw std::invalid_argument("process_group_backend='nccl' is not built in; " + valid);
    }
    return;
  }
  throw std::invalid_argument("process_group_backend='" + backend + "' is not supported; " +
                              valid);
}

ProcessGroupHandle create_process_group(const ProcessGroupOptions& options) {
  check_backend(options.backend, options.device.type());
  if (options.backend == "mpi" && options.world_size > 1 && !launched_by_mpi()) {
    throw std::runtime_error(
        "the mpi backend needs its ranks started by Open MPI (mpirun, or fabric-run / "
        "fabric.launch() which call it): independently started processes cannot form an "
        "MPI world, and Gloo is not available in this LibTorch. Start the job with "
        "`mpirun -np N PROGRAM` or `fabric-run --devices N PROGRAM`");
  }
  std::string addr = options.master_addr.empty() ? env_or("MASTER_ADDR", "") : options.master_addr;
  int port = options.master_port;
  if (port == 0) port = std::atoi(env_or("MASTER_PORT", "0").c_str());
  bool broadcast_by_mpi = false;
  if (addr.empty() && options.world_size == 1) {
    addr = "127.0.0.1";  // nobody else to meet: any free port
  } else if (addr.empty() && launched_by_mpi()) {
    const std::string size = env_or("OMPI_COMM_WORLD_SIZE", "1");
    if (env_or("OMPI_COMM_WORLD_LOCAL_SIZE", "") == size) {
      // One node: meet on loopback, on a port derived from this mpirun job's id
      // (so the rendezvous, with its timeout, happens before MPI_Init, which would
      // wait forever for a rank that never starts).
      addr = "127.0.0.1";
      if (port == 0) {
        const long job = std::atol(env_or("OMPI_MCA_ess_base_jobid", "0").c_str());
        port = 20000 + static_cast<int>(job % 30000);
      }
    } else {
      // Several nodes: rank 0 tells everyone its address with MPI.
      addr = host_address();
      broadcast_by_mpi = true;
    }
  } else if (addr.empty() || port == 0) {
    throw std::runtime_error(
        "MASTER_ADDR and MASTER_PORT must be set for a " + std::to_string(options.world_size) +
        "-process job that was not started by mpirun (got MASTER_ADDR='" + addr +
        "', MASTER_PORT=" + std::to_string(port) + ")");
  }
  const bool choose_address = broadcast_by_mpi || (options.world_size == 1 && port == 0);

  c10d::TCPStoreOptions store_options;
  store_options.port = static_cast<std::uint16_t>(choose_address ? 0 : port);
  store_options.isServer = options.rank == 0;
  store_options.numWorkers = static_cast<std::size_t>(options.world_size);
  store_options.waitWorkers = false;  // check_in() waits, with a message on timeout
  store_options.timeout = options.timeout;
  c10::intrusive_ptr<c10d::TCPStore> tcp;
  if (options.rank == 0) {
    tcp = c10::make_intrusive<c10d::TCPStore>(addr, store_options);
    port = tcp->getPort();
  }
  if (broadcast_by_mpi) broadcast_address(addr, port, options.rank);
  if (options.rank != 0) {
    store_options.port = static_cast<std::uint16_t>(port);
    try {
      tcp = c10::make_intrusive<c10d::TCPStore>(addr, store_options);
    } catch (const std::exception& e) {
      throw std::runtime_error("rank " + std::to_string(options.rank) +
                               " could not reach the rendezvous store at " + addr + ":" +
                               std::to_string(port) + " within the timeout: " + e.what());
    }
  }
  const std::string where = addr + ":" + std::to_string(port);
  check_in(*tcp, options.rank, options.world_size, options.timeout, where);

  ProcessGroupHandle handle;
  handle.store = tcp;
  auto group = c10::make_intrusive<c10d::ProcessGroup>(
      c10::make_intrusive<c10d::PrefixStore>("torchfabric", tcp),
      static_cast<int>(options.rank), static_cast<int>(options.world_size));
  if (options.backend == "mpi") {
    auto backend = c10::make_intrusive<MPIBackend>();
    if (backend->getRank() != options.rank || backend->getSize() != options.world_size) {
      throw std::runtime_error("MPI says rank " + std::to_string(backend->getRank()) + " of " +
                               std::to_string(backend->getSize()) + " but Fabric expected rank " +
                               std::to_string(options.rank) + " of " +
                               std::to_string(options.world_size));
    }
    group->setBackend(c10::DeviceType::CPU, c10d::ProcessGroup::BackendType::MPI, backend);
    group->setDefaultBackend(c10d::ProcessGroup::BackendType::MPI);
  } else {
    auto backend = make_nccl_backend(c10::make_intrusive<c10d::PrefixStore>("nccl", tcp),
                                     static_cast<int>(options.rank),
                                     static_cast<int>(options.world_size), options.timeout);
    group->setBackend(c10::DeviceType::CUDA, c10d::ProcessGroup::BackendType::NCCL, backend);
    group->setDefaultBackend(c10d::ProcessGroup::BackendType::NCCL);
  }
  handle.group = group;
  return handle;
}

}  // namespace fabric::strategies
