// Restarting a job whose rank died, as torchrun's --max-restarts does: every
// attempt runs the whole job; when a rank of it dies, its launcher ends every
// other rank of that attempt (mpirun on every node it reached, the Supervisor
// for directly started ranks), and the next attempt starts from scratch with
// FABRIC_RESTART_COUNT (and torchrun's TORCHELASTIC_RESTART_COUNT and
// TORCHELASTIC_MAX_RESTARTS) in its environment. Continuing where the last
// attempt got to is the training loop's job: it loads its newest checkpoint
// (examples/custom_trainer, or --resume auto in the other examples).
//
// Used by fabric-run --max-restarts and by Fabric::launch with
// FabricOptions::max_restarts (the launching process then only supervises).
#pragma once

#include <functional>
#include <string>
#include <vector>

namespace fabric::launchers {

// How one attempt ended.
struct AttemptOutcome {
  int status = 0;        // 0: success; else the job's exit status (128 + signal for a kill)
  std::string failure;   // which rank ended it and how, when known ("rank 1 was killed by signal 9 (Killed)")
};

// Runs attempt() until one succeeds, restarting at most `max_restarts` times;
// before each attempt the restart variables above are set in this process's
// environment (inherited by what the attempt starts). Each restart prints one line
// to stderr naming the failure and the attempt that follows; running out prints
// the last failure. A SIGINT or SIGTERM received meanwhile (forward them with
// forward_stop_signals) ends the loop without a restart. Returns the last status.
// `who` prefixes the lines ("fabric-run", "torchfabric").
int run_with_restarts(int max_restarts, const std::string& who,
                      const std::function<AttemptOutcome()>& attempt);

// This process's attempt: FABRIC_RESTART_COUNT (else TORCHELASTIC_RESTART_COUNT),
// 0 outside a restarted job.
int restart_count();

// Runs `argv` (an mpirun command line) as a child and waits for it, copying its
// standard error to ours while reading from it which rank ended the job and how:
// the first rank watcher's line (launchers/rank_watch.h; ranks started through
// watched_mpirun_command), else mpirun's own report ("process rank R ... exited on
// signal S", "Process name: [[j,1],R] Exit code: S"), which mpirun sometimes
// leaves out. SIGINT and SIGTERM reach the child while it runs.
AttemptOutcome run_mpirun_attempt(const std::vector<std::string>& argv);

class Supervisor;
// One attempt of ranks started directly: `start_ranks` starts them on the
// Supervisor given (launchers/supervisor.h), which then watches them; SIGINT
// and SIGTERM reach them while it runs.
AttemptOutcome run_supervised_attempt(const std::function<void(Supervisor&)>& start_ranks);
// ... for a single-node job of `nprocs` ranks of `command`, each with
// torchrun-style variables and a fresh rendezvous port.
AttemptOutcome run_local_attempt(int nprocs, const std::vector<std::string>& command);

// What mpirun's standard error says about the rank that ended its job, or "".
std::string mpirun_failure(const std::string& stderr_text);

}  // namespace fabric::launchers
