// Starting the other local ranks of a single-node job that nothing launched, for
// devices whose collectives do not need an MPI world (CUDA with NCCL): this
// process becomes rank 0 and re-executes its own command line for ranks
// 1..N-1 with torchrun-style variables (no fork after CUDA initialisation).
//
// Supervision: a watcher thread waits for exactly the spawned pids. When one
// fails, the others are stopped and this process exits at once with a message
// naming the rank and its status. When rank 0 finishes its own work (join(), or
// the destructor), it waits for the others, so the job's exit status reflects
// every rank and no rank is killed half-way through its work. But when rank 0 is
// unwinding an exception (the destructor runs with more exceptions in flight than
// at construction: the Fabric, declared inside the try, is destroyed on the way
// to the handler), the others cannot finish without it and would wait in their
// next collective until its timeout (30 minutes): they are stopped at once
// (SIGTERM, SIGKILL after the grace period) and the exception goes on. A Fabric
// declared outside the try cannot tell; call stop() in the handler then.
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace fabric::launchers {

class Supervisor;

// This node's place in the job, for LocalRanks. One node (the default): the ranks
// meet on loopback at a free port. Several (one launcher per node, e.g. one srun
// task per node): global ranks node_rank*nprocs.., meeting at main_address:main_port.
struct LocalRanksNode {
  int num_nodes = 1;
  int node_rank = 0;
  std::string main_address;
  int main_port = 0;
};

class LocalRanks {
 public:
  // What happens when a spawned rank fails (default: std::_Exit(status)); the
  // argument is the failing rank's status (128 + signal for a killed rank).
  using FailureHandler = std::function<void(int status)>;

  using Node = LocalRanksNode;

  // Starts `command` (default: this program's own command line) for local ranks
  // 1..nprocs-1 and sets this process's own torchrun-style variables as local rank 0.
  LocalRanks(int nprocs, std::vector<std::string> command = {}, FailureHandler on_failure = {},
             Node node = {});
  // join()s, or stop()s while an exception unwinds (see above).
  ~LocalRanks();
  LocalRanks(const LocalRanks&) = delete;
  LocalRanks& operator=(const LocalRanks&) = delete;

  // Waits until every spawned rank has exited; returns 0 when all succeeded,
  // else the first failing rank's status (after on_failure ran).
  int join();
  // Ends the spawned ranks now (SIGTERM, then SIGKILL after the grace period)
  // and waits for them; the failure handler is not called for them.
  void stop();
  // The spawned ranks' process ids (ranks 1..nprocs-1).
  std::vector<int> pids() const;

 private:
  std::unique_ptr<Supervisor> supervisor_;
  std::thread watcher_;
  int status_ = 0;
  int exceptions_at_start_ = 0;
  std::atomic<bool> stopping_{false};
};

}  // namespace fabric::launchers
