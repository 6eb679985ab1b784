#include "strategies/process_group.h"

// C API only: the deprecated MPI C++ bindings need libmpi_cxx.
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>

#include <algorithm>
#include <arpa/inet.h>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <ifaddrs.h>
#include <net/if.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdexcept>
#include <sys/socket.h>
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

// This host's name (what the error messages name rank 0's node by).
std::string host_name() {
  char name[256] = {0};
  if (::gethostname(name, sizeof(name) - 1) != 0) return "?";
  return name;
}

// An IPv4 interface of this host that is up and not loopback.
struct Interface {
  in_addr addr{}, mask{};
};

std::vector<Interface> ipv4_interfaces() {
  std::vector<Interface> out;
  ifaddrs* list = nullptr;
  if (::getifaddrs(&list) != 0) return out;
  for (ifaddrs* i = list; i; i = i->ifa_next) {
    if (!i->ifa_addr || i->ifa_addr->sa_family != AF_INET) continue;
    if (!(i->ifa_flags & IFF_UP) || (i->ifa_flags & IFF_LOOPBACK)) continue;
    Interface itf;
    itf.addr = reinterpret_cast<sockaddr_in*>(i->ifa_addr)->sin_addr;
    if (i->ifa_netmask) itf.mask = reinterpret_cast<sockaddr_in*>(i->ifa_netmask)->sin_addr;
    if ((ntohl(itf.addr.s_addr) >> 24) == 127) continue;
    out.push_back(itf);
  }
  ::freeifaddrs(list);
  return out;
}

std::string to_string(in_addr addr) {
  char text[INET_ADDRSTRLEN] = {0};
  ::inet_ntop(AF_INET, &addr, text, sizeof(text));
  return text;
}

std::vector<std::string> split(const std::string& text, char sep) {
  std::vector<std::string> out;
  std::string item;
  for (char c : text) {
    if (c == sep) {
      if (!item.empty()) out.push_back(item);
      item.clear();
    } else {
      item += c;
    }
  }
  if (!item.empty()) out.push_back(item);
  return out;
}

// What rank 0 advertises across nodes: its interfaces' IPv4 addresses, then its
// host name (for nodes where it resolves), comma-separated.
std::string advertised_addresses() {
  std::string out;
  for (const auto& itf : ipv4_interfaces()) out += to_string(itf.addr) + ",";
  return out + host_name();
}

// Rank 0's candidates in the order this node tries them: addresses on a subnet
// of one of this node's interfaces first, then the other addresses, then names,
// then the addresses this node has itself (which reach rank 0 only from its own
// node; elsewhere they are the same private address, e.g. a container bridge,
// on this node).
std::vector<std::string> order_candidates(const std::vector<std::string>& candidates) {
  const auto mine = ipv4_interfaces();
  std::vector<std::string> near, far, names, local;
  for (const auto& c : candidates) {
    in_addr addr{};
    if (::inet_pton(AF_INET, c.c_str(), &addr) != 1) {
      names.push_back(c);
      continue;
    }
    if (std::any_of(mine.begin(), mine.end(),
                    [&](const Interface& i) { return i.addr.s_addr == addr.s_addr; })) {
      local.push_back(c);
      continue;
    }
    const bool same_subnet = std::any_of(mine.begin(), mine.end(), [&](const Interface& i) {
      return i.mask.s_addr != 0 && (i.addr.s_addr & i.mask.s_addr) == (addr.s_addr & i.mask.s_addr);
    });
    (same_subnet ? near : far).push_back(c);
  }
  for (auto* more : {&far, &names, &local}) near.insert(near.end(), more->begin(), more->end());
  return near;
}

bool is_loopback(const sockaddr* a) {
  if (a->sa_family == AF_INET) {
    return (ntohl(reinterpret_cast<const sockaddr_in*>(a)->sin_addr.s_addr) >> 24) == 127;
  }
  return a->sa_family == AF_INET6 &&
         IN6_IS_ADDR_LOOPBACK(&reinterpret_cast<const sockaddr_in6*>(a)->sin6_addr);
}

// Opens (and closes) a TCP connection to host:port within `timeout`; "" when it
// worked, else why not.
std::string try_connect(const std::string& host, int port, std::chrono::milliseconds timeout) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  in_addr numeric{};
  if (::inet_pton(AF_INET, host.c_str(), &numeric) == 1) hints.ai_flags = AI_NUMERICHOST;
  addrinfo* found = nullptr;
  const int gai = ::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &found);
  if (gai != 0) return std::string("does not resolve: ") + ::gai_strerror(gai);
  std::string why = "no address";
  for (addrinfo* a = found; a; a = a->ai_next) {
    if (!numeric.s_addr && is_loopback(a->ai_addr)) {
      why = "resolves to a loopback address here";  // not rank 0's node, most likely
      continue;
    }
    const int fd = ::socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) {
      why = std::strerror(errno);
      continue;
    }
    int error = 0;
    if (::connect(fd, a->ai_addr, a->ai_addrlen) != 0) {
      error = errno;
      if (error == EINPROGRESS) {
        pollfd p{fd, POLLOUT, 0};
        const int ready = ::poll(&p, 1, static_cast<int>(timeout.count()));
        if (ready == 0) {
          error = ETIMEDOUT;
        } else if (ready < 0) {
          error = errno;
        } else {
          socklen_t len = sizeof(error);
          if (::getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &len) != 0) error = errno;
        }
      }
    }
    ::close(fd);
    if (error == 0) {
      ::freeaddrinfo(found);
      return "";
    }
    char seconds[32];
    std::snprintf(seconds, sizeof(seconds), "%.1f", timeout.count() / 1000.0);
    why = error == ETIMEDOUT ? "no answer within " + std::string(seconds) + " s" : std::strerror(error);
  }
  ::freeaddrinfo(found);
  return why;
}

// The first of rank 0's candidate addresses this node can connect to at `port`
// (rank 0's store is already listening). Tries them in turn, a few seconds each,
// in rounds until `limit`; then throws, naming every address tried and why it
// failed, and MASTER_ADDR.
std::string reach_rank0(const std::vector<std::string>& candidates, int port, int64_t rank,
                        bool from_master_addr, std::chrono::milliseconds limit) {
  const auto start = std::chrono::steady_clock::now();
  const auto deadline = start + limit;
  std::vector<std::string> why(candidates.size());
  for (;;) {
    for (size_t i = 0; i < candidates.size(); ++i) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          deadline - std::chrono::steady_clock::now());
      const auto wait = std::clamp(left, std::chrono::milliseconds(200), std::chrono::milliseconds(3000));
      why[i] = try_connect(candidates[i], port, wait);
      if (why[i].empty()) return candidates[i];
    }
    if (std::chrono::steady_clock::now() >= deadline) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
  }
  std::string tried;
  for (size_t i = 0; i < candidates.size(); ++i) {
    tried += (i ? "; " : "") + candidates[i] + ":" + std::to_string(port) + " (" + why[i] + ")";
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::string advice =
      from_master_addr
          ? "MASTER_ADDR must be an address of rank 0's node that every node can reach; set "
            "MASTER_ADDR to another one"
          : "none of rank 0's addresses is reachable from this node (host " + host_name() +
                "); set MASTER_ADDR to an address of rank 0's node that every node can reach "
                "(and MASTER_PORT to a port they may connect to)";
  throw std::runtime_error("rank " + std::to_string(rank) + " could not reach rank 0's "
                           "rendezvous store within " + std::to_string(static_cast<int>(seconds)) +
                           " s; tried " + tried + ". " + advice);
}

// Under mpirun: rank 0's store address(es) and port, sent to everyone with MPI.
void broadcast_address(std::string& addr, int& port, int64_t rank) {
  mpi_world();
  int sizes[2] = {static_cast<int>(addr.size()), port};
  MPI_Bcast(sizes, 2, MPI_INT, 0, MPI_COMM_WORLD);
  std::vector<char> buffer(addr.begin(), addr.end());
  buffer.resize(static_cast<size_t>(sizes[0]));
  MPI_Bcast(buffer.data(), sizes[0], MPI_CHAR, 0, MPI_COMM_WORLD);
  if (rank != 0) addr.assign(buffer.begin(), buffer.end());
  port = sizes[1];
}

// Under MPI: the ranks whose `failed` is true, comma-separated ("" when none).
std::string ranks_that_failed(bool failed, int64_t world_size) {
  std::vector<int> flags(static_cast<size_t>(world_size), 0);
  int mine = failed ? 1 : 0;
  MPI_Allgather(&mine, 1, MPI_INT, flags.data(), 1, MPI_INT, MPI_COMM_WORLD);
  std::string out;
  for (int64_t r = 0; r < world_size; ++r) {
    if (flags[static_cast<size_t>(r)]) out += (out.empty() ? "" : ", ") + std::to_string(r);
  }
  return out;
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

namespace {

// The srun step this process is a task of ("" when srun did not start it).
std::string srun_step_id() { return env_or("SLURM_STEP_ID", env_or("SLURM_STEPID", "")); }

// Where the ranks of an MPI job are, as far as the launcher says before MPI_Init.
struct MpiJob {
  bool one_node = false;  // every rank on this node
  long id = 0;            // differs between concurrent jobs on the node
};

MpiJob mpi_job() {
  MpiJob job;
  if (!env_or("OMPI_COMM_WORLD_SIZE", "").empty()) {  // mpirun
    job.one_node = env_or("OMPI_COMM_WORLD_LOCAL_SIZE", "") == env_or("OMPI_COMM_WORLD_SIZE", "1");
    job.id = std::atol(env_or("OMPI_MCA_ess_base_jobid", "0").c_str());
  } else if (!srun_step_id().empty()) {  // srun --mpi=pmix
    const std::string nodes = env_or("SLURM_STEP_NUM_NODES", env_or("SLURM_NNODES", ""));
    job.one_node = nodes == "1";
    // Steps of one job are numbered 0, 1, ...; jobs are numbered too: one id per step.
    job.id = std::atol(env_or("SLURM_JOB_ID", "0").c_str()) * 101 +
             std::atol(srun_step_id().c_str());
  }
  // Another PMIx launcher: the layout is not known before MPI_Init; rank 0 sends
  // its addresses and port over MPI, which works on one node and on many.
  return job;
}

}  // namespace

int job_rendezvous_port(long job_id, int ephemeral_low, int ephemeral_high) {
  const long job = job_id < 0 ? -job_id : job_id;
  constexpr int kFirst = 10000, kLast = 65535, kEnough = 1000;
  if (ephemeral_low - kFirst >= kEnough) return kFirst + static_cast<int>(job % (ephemeral_low - kFirst));
  if (kLast - ephemeral_high >= kEnough) {
    return ephemeral_high + 1 + static_cast<int>(job % (kLast - ephemeral_high));
  }
  return 20000 + static_cast<int>(job % 30000);
}

ProcessGroupHandle create_process_group(const ProcessGroupOptions& options) {
  check_backend(options.backend, options.device.type());
  if (options.backend == "mpi" && options.world_size > 1 && !launched_by_mpi()) {
    if (!srun_step_id().empty()) {
      throw std::runtime_error(
          "the mpi backend needs an MPI world, but srun started these " +
          std::to_string(options.world_size) + " tasks without PMIx (SLURM_MPI_TYPE='" +
          env_or("SLURM_MPI_TYPE", "") + "'), so Open MPI cannot join them. Add --mpi=pmix to "
          "srun (srun --mpi=pmix -n " + std::to_string(options.world_size) +
          " PROGRAM; `srun --mpi=list` shows the cluster's types), or start the ranks with "
          "mpirun inside the allocation (mpirun PROGRAM in the sbatch script)");
    }
    throw std::runtime_error(
        "the mpi backend needs its ranks started by Open MPI (mpirun, or fabric-run / "
        "fabric.launch() which call it) or by srun --mpi=pmix: independently started processes "
        "cannot form an MPI world, and Gloo is not available in this LibTorch. Start the job with "
        "`mpirun -np N PROGRAM` or `fabric-run --devices N PROGRAM`");
  }
  std::string addr = options.master_addr.empty() ? env_or("MASTER_ADDR", "") : options.master_addr;
  int port = options.master_port;
  if (port == 0) port = std::atoi(env_or("MASTER_PORT", "0").c_str());
  // Across nodes under mpirun rank 0 sends, with MPI, the port (when none is set)
  // and, without MASTER_ADDR, the list of its addresses for the others to try.
  bool broadcast_port = false, broadcast_addresses = false, derived_port = false;
  if (addr.empty() && options.world_size == 1) {
    addr = "127.0.0.1";  // nobody else to meet: any free port
  } else if (launched_by_mpi()) {
    const MpiJob job_layout = mpi_job();
    if (job_layout.one_node) {
      // One node: meet on loopback (or MASTER_ADDR), on a port derived from this
      // mpirun job's (or srun step's) id, so the rendezvous, with its timeout,
      // happens before MPI_Init, which would wait forever for a rank that never starts.
      if (addr.empty()) addr = "127.0.0.1";
      if (port == 0) {
        const long job = job_layout.id;
        int low = 32768, high = 60999;
        std::ifstream("/proc/sys/net/ipv4/ip_local_port_range") >> low >> high;
        port = job_rendezvous_port(job, low, high);
        derived_port = true;
      }
    } else if (addr.empty()) {
      broadcast_addresses = true;
      broadcast_port = true;
    } else if (port == 0) {
      broadcast_port = true;
    }
  } else if (addr.empty() || port == 0) {
    throw std::runtime_error(
        "MASTER_ADDR and MASTER_PORT must be set for a " + std::to_string(options.world_size) +
        "-process job that was not started by mpirun (got MASTER_ADDR='" + addr +
        "', MASTER_PORT=" + std::to_string(port) + ")");
  }

  c10d::TCPStoreOptions store_options;
  store_options.port = static_cast<std::uint16_t>(port);  // 0: any free port
  store_options.isServer = options.rank == 0;
  store_options.numWorkers = static_cast<std::size_t>(options.world_size);
  store_options.waitWorkers = false;  // check_in() waits, with a message on timeout
  store_options.timeout = options.timeout;
  c10::intrusive_ptr<c10d::TCPStore> tcp;
  std::string advertised = addr;
  if (options.rank == 0) {
    // The store listens on every interface; when the others are told where it is
    // with MPI, rank 0 itself connects over loopback.
    try {
      tcp = c10::make_intrusive<c10d::TCPStore>(broadcast_port ? "127.0.0.1" : addr, store_options);
    } catch (const std::exception& e) {
      throw std::runtime_error(
          "rank 0 could not open the rendezvous store on port " + std::to_string(port) +
          (derived_port ? " (derived from the mpirun job's or srun step's id)" : "") + ": " + e.what() +
          ". Set MASTER_PORT to a free port");
    }
    port = tcp->getPort();
    if (broadcast_addresses) advertised = advertised_addresses();
  }
  if (broadcast_port) {
    broadcast_address(advertised, port, options.rank);
    // Rank 0's store is listening already: a minute (at most the timeout) is
    // enough to tell that none of the addresses works from a node.
    std::string failure;
    if (options.rank != 0) {
      const auto limit = std::min<std::chrono::milliseconds>(options.timeout, std::chrono::minutes(1));
      const auto candidates = broadcast_addresses ? order_candidates(split(advertised, ','))
                                                  : std::vector<std::string>{addr};
      try {
        addr = reach_rank0(candidates, port, options.rank, !broadcast_addresses, limit);
      } catch (const std::runtime_error& e) {
        failure = e.what();
      }
    }
    // Everyone learns who failed, so that every rank stops now: a rank that just
    // threw would wait at exit (MPI_Finalize) for rank 0, which would wait in
    // check_in() for the whole timeout.
    const auto failed = ranks_that_failed(!failure.empty(), options.world_size);
    if (!failure.empty()) throw std::runtime_error(failure);
    if (!failed.empty()) {
      throw std::runtime_error(
          "rank(s) " + failed + " of " + std::to_string(options.world_size) +
          " could not reach rank 0's rendezvous store (port " + std::to_string(port) + ", at " +
          (broadcast_addresses ? "any of " + advertised : "MASTER_ADDR=" + addr) +
          "): see their message; set MASTER_ADDR to an address of rank 0's node that every "
          "node can reach");
    }
  }
  if (options.rank == 0 && broadcast_addresses) {
    addr = advertised;
  } else if (options.rank != 0) {
    store_options.port = static_cast<std::uint16_t>(port);
    try {
      tcp = c10::make_intrusive<c10d::TCPStore>(addr, store_options);
    } catch (const std::exception& e) {
      throw std::runtime_error("rank " + std::to_string(options.rank) +
                               " could not reach the rendezvous store at " + addr + ":" +
                               std::to_string(port) + " within the timeout: " + e.what());
    }
  }
  const std::string where = (options.rank == 0 && broadcast_addresses ? "{" + addr + "}" : addr) +
                            ":" + std::to_string(port);
  check_in(*tcp, options.rank, options.world_size, options.timeout, where);

  ProcessGroupHandle handle;
  handle.store = tcp;
  auto group = c10::make_intrusive<c10d::ProcessGroup>(
      c10::make_intrusive<c10d::PrefixStore>("torchfabric", tcp),
      static_cast<int>(options.rank), static_cast<int>(options.world_size));
  if (options.backend == "mpi") {
    MPIBackendOptions mpi;
    mpi.collective_timeout = options.collective_timeout;
    mpi.store = tcp;
    auto backend = c10::make_intrusive<MPIBackend>(mpi);
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
                                     static_cast<int>(options.world_size),
                                     options.collective_timeout);
    group->setBackend(c10::DeviceType::CUDA, c10d::ProcessGroup::BackendType::NCCL, backend);
    group->setDefaultBackend(c10d::ProcessGroup::BackendType::NCCL);
  }
  handle.group = group;
  return handle;
}

ProcessGroupHandle create_sub_group(const ProcessGroupHandle& world,
                                    const ProcessGroupOptions& options, const std::string& name,
                                    int color, int rank, int size) {
  if (!world.group) throw std::logic_error("create_sub_group: the world's process group does not exist yet");
  if (size < 1 || rank < 0 || rank >= size) {
    throw std::invalid_argument("create_sub_group(" + name + "): rank " + std::to_string(rank) +
                                " is not in a group of " + std::to_string(size));
  }
  ProcessGroupHandle handle;
  handle.store = c10::make_intrusive<c10d::PrefixStore>(
      "torchfabric/" + name + "/" + std::to_string(color), world.store);
  auto group = c10::make_intrusive<c10d::ProcessGroup>(handle.store, rank, size);
  if (options.backend == "mpi") {
    MPIBackendOptions mpi;
    mpi.split_color = color;
    mpi.split_key = rank;
    auto backend = c10::make_intrusive<MPIBackend>(mpi);
    if (backend->getRank() != rank || backend->getSize() != size) {
      throw std::runtime_error("create_sub_group(" + name + "): MPI's split says rank " +
                               std::to_string(backend->getRank()) + " of " +
                               std::to_string(backend->getSize()) + ", expected rank " +
                               std::to_string(rank) + " of " + std::to_string(size));
    }
    group->setBackend(c10::DeviceType::CPU, c10d::ProcessGroup::BackendType::MPI, backend);
    group->setDefaultBackend(c10d::ProcessGroup::BackendType::MPI);
  } else {
    auto backend = make_nccl_backend(c10::make_intrusive<c10d::PrefixStore>("nccl", handle.store),
                                     rank, size, options.collective_timeout);
    group->setBackend(c10::DeviceType::CUDA, c10d::ProcessGroup::BackendType::NCCL, backend);
    group->setDefaultBackend(c10d::ProcessGroup::BackendType::NCCL);
  }
  handle.group = group;
  return handle;
}

}  // namespace fabric::strategies
