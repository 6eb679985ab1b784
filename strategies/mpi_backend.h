// A c10d::Backend on Open MPI, for CPU tensors. Pip's LibTorch ships no
// ProcessGroupMPI, so this is ours: it implements the collectives Fabric and the
// DDP and FSDP strategies use (broadcast, allreduce, allgather, the flat
// all-gather and reduce-scatter, barrier) behind c10d's
// Backend interface, so the rest of the code sees one c10d::ProcessGroup.
//
// Every MPI call of the process runs on one worker thread shared by all backends
// (the world's and its sub-groups'), in the order the collectives were issued:
// calls return at once with a c10d::Work, which lets DDP overlap gradient
// all-reduce with the rest of backward, and MPI only ever sees one caller
// (MPI_THREAD_SERIALIZED). A backend over a sub-group (split_color) serves a 2-D
// mesh (model_parallel's tensor- and data-parallel groups): every rank must issue
// its collectives on all groups in the same order, as SPMD programs do. The ranks must have been started by mpirun (or another
// Open MPI launcher) or by srun --mpi=pmix: two independently started processes
// cannot form a world.
// With a collective timeout, a CollectiveWatchdog (collective_watchdog.h) ends the
// job when a collective does not complete in time, naming the ranks not in it.
#pragma once

#include <chrono>
#include <functional>
#include <memory>

#include <torch/csrc/distributed/c10d/Backend.hpp>

#include "strategies/collective_watchdog.h"

namespace fabric::strategies {

// Initialises MPI on first use (MPI_THREAD_SERIALIZED) and finalises it at exit.
// Returns {rank, size} of MPI_COMM_WORLD.
std::pair<int, int> mpi_world();
// True when this process can join an MPI world through MPI_Init: it was started by
// an Open MPI launcher (mpirun: OMPI_COMM_WORLD_SIZE set) or by a PMIx launcher
// that Open MPI's PMIx support joins (srun --mpi=pmix: PMIX_RANK set).
bool launched_by_mpi();

// Timing of one collective, for overlap measurements.
struct CollectiveTiming {
  std::chrono::steady_clock::time_point start, end;
};

struct MPIBackendOptions {
  // How long a collective may take on this rank before the watchdog ends the job;
  // 0: no watchdog (a collective some rank never enters waits forever).
  std::chrono::milliseconds collective_timeout{0};
  // The rendezvous store, through which the watchdogs tell each other where they are.
  c10::intrusive_ptr<c10d::Store> store;
  // A sub-group: MPI_Comm_split of the world by this color (ranks with the same
  // color form one group), ordered by split_key. -1: the world itself. Every rank
  // must construct its sub-group backends in the same order (the split is
  // collective). Sub-groups have no watchdog of their own: a stalled one holds
  // the shared worker, and the world's watchdog reports the next world collective.
  int split_color = -1;
  int split_key = 0;
};

class MPIBackend : public c10d::Backend {
 public:
  // Uses MPI_COMM_WORLD (or its split, see split_color); initialises MPI if needed.
  explicit MPIBackend(MPIBackendOptions options = {});
  ~MPIBackend() override;

  const std::string getBackendName() const override { return "mpi"; }

  c10::intrusive_ptr<c10d::Work> broadcast(std::vector<at::Tensor>& tensors,
                                           const c10d::BroadcastOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allreduce(std::vector<at::Tensor>& tensors,
                                           const c10d::AllreduceOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allgather(std::vector<std::vector<at::Tensor>>& outputs,
                                           std::vector<at::Tensor>& inputs,
                                           const c10d::AllgatherOptions& opts) override;
  // Flat forms, for sharded training: the output holds every rank's input in rank
  // order; the input holds world_size equal chunks and rank r gets chunk r reduced.
  c10::intrusive_ptr<c10d::Work> _allgather_base(at::Tensor& output, at::Tensor& input,
                                                 const c10d::AllgatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> _reduce_scatter_base(
      at::Tensor& output, at::Tensor& input, const c10d::ReduceScatterOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> barrier(const c10d::BarrierOptions& opts) override;

  class Work;          // completed on the worker thread; records its timing
  struct Communicator;  // the MPI communicator (mpi.h stays out of this header)

 private:
  MPIBackend(MPIBackendOptions options, std::shared_ptr<Communicator> comm);
  c10::intrusive_ptr<c10d::Work> enqueue(c10d::OpType type, const char* name,
                                         std::vector<at::Tensor> outputs,
                                         std::function<void()> run);

  std::shared_ptr<Communicator> comm_;
  std::unique_ptr<CollectiveWatchdog> watchdog_;  // null without a timeout, alone or a sub-group
};

// The start and end time of a Work returned by MPIBackend (nullopt for other Works).
std::optional<CollectiveTiming> collective_timing(const c10::intrusive_ptr<c10d::Work>& work);

}  // namespace fabric::strategies
