// A watcher between mpirun and each rank of a restarted job, so that every
// restart can say which rank died and how.
//
// Why: mpirun does not always say it. Open MPI 4.1, two ranks, rank 1 exiting 5
// or killed by SIGKILL on a loaded machine: about one run in five prints only
// "Primary job terminated normally, but 1 process returned a non-zero exit code"
// and exits with that rank's status, without the rank (measured: 6 of 30 and
// 5 of 30 with four busy loops on two cores). So under --max-restarts each rank
// runs below a small parent process: it starts the rank's program, forwards the
// signals mpirun sends to it, and when the program ends with a failure of its own
// (not one mpirun or the user asked for by signalling the watcher) it writes one
// line naming the rank, its host and how it ended, then ends the same way (the
// same exit status, the same signal). mpirun forwards a rank's output before it
// acts on the rank's end, so the line is in mpirun's output every time.
//
// The program is a child, not exec'd in place: it dies with its watcher
// (PR_SET_PDEATHSIG), so a watcher killed by mpirun's SIGKILL leaves nothing behind.
#pragma once

#include <string>
#include <vector>

namespace fabric::launchers {

// Set in a rank's environment (mpirun -x) to make Fabric::launch() become the
// watcher of its own program (started again as the child, without the variable).
inline constexpr const char* kWatchRankVariable = "TORCHFABRIC_WATCH_RANK";

// Runs `program` (argv, searched in PATH) under a watcher as described above and
// ends this process as the program ended. Does not return; throws
// std::invalid_argument for an empty program and std::runtime_error when it
// cannot start it.
[[noreturn]] void watch_rank(const std::vector<std::string>& program);

// "rank 1 on node3 was killed by signal 9 (Killed)" (or "... exited with status
// 5") from the first watcher line in `text`, or "" when there is none.
std::string watched_rank_failure(const std::string& text);

}  // namespace fabric::launchers
