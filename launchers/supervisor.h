// Starts rank processes and watches them, for launches that do not go through
// mpirun (CUDA ranks with NCCL, torchrun-style variables). When a rank exits
// non-zero or is killed, the others get SIGTERM, then SIGKILL after a grace
// period, and the job ends non-zero with a message naming the rank and how it
// ended. Children die with their parent (PR_SET_PDEATHSIG), so none is orphaned.
#pragma once

#include <atomic>
#include <chrono>
#include <map>
#include <optional>
#include <utility>
#include <string>
#include <sys/types.h>
#include <vector>

namespace fabric::launchers {

class Supervisor {
 public:
  explicit Supervisor(std::chrono::milliseconds grace = std::chrono::seconds(5)) : grace_(grace) {}

  // Starts `argv` for `rank` with `env` added to this process's environment.
  void start(int rank, const std::vector<std::string>& argv,
             const std::map<std::string, std::string>& env);
  // Waits for every child (only the children it started: other children of this
  // process are left alone). Returns 0 when all exited 0; otherwise stops the rest
  // and returns the failing rank's exit code (128 + signal for a killed rank),
  // after printing "rank R ... exited with status S" / "was killed by signal N".
  int wait_all();
  // Sends `signal` to every child still running.
  void signal_all(int signal);
  // Asks a wait_all() running in another thread to end every child (SIGTERM,
  // SIGKILL after the grace period) and return; no rank is reported as failed.
  void request_stop() { stop_requested_ = true; }
  // Forwards SIGINT and SIGTERM received by this process to the children.
  void forward_signals();

  const std::vector<pid_t>& pids() const { return pids_; }
  // After wait_all() returned non-zero: which rank failed first and how
  // ("rank 1 (pid 123) was killed by signal 9 (Killed)").
  const std::string& failure() const { return failure_; }
  // Children still running.
  size_t running() const;

 private:
  // Reaps one finished child of ours, if any: its index and wait status.
  std::optional<std::pair<size_t, int>> reap_one();

  std::chrono::milliseconds grace_;
  std::vector<pid_t> pids_;
  std::vector<int> ranks_;
  std::vector<bool> running_;
  std::atomic<bool> stop_requested_{false};
  std::string failure_;
};

// The variables a torchrun-style launch sets for one rank.
std::map<std::string, std::string> torchrun_environment(int global_rank, int local_rank,
                                                        int world_size, int local_world_size,
                                                        int node_rank,
                                                        const std::string& main_address,
                                                        int main_port);

// A free TCP port on this machine (for a single-node job's rendezvous).
int free_port();

}  // namespace fabric::launchers
