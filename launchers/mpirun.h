// Starting CPU ranks through Open MPI. The CPU collectives run on MPI, and only
// processes that an Open MPI launcher started can form one MPI world, so a
// multi-process CPU job is (re)started under `mpirun`. mpirun also gives the
// supervision we want: when one rank exits non-zero or is killed, it terminates
// the others and exits non-zero naming that rank; Ctrl-C reaches every rank.
#pragma once

#include <string>
#include <vector>

namespace fabric::launchers {

// argv of `mpirun -np N ... PROGRAM ARGS...` for N local ranks: no core binding
// (ranks use all cores between them), oversubscription allowed, root allowed
// when running as root (CI does).
std::vector<std::string> mpirun_command(int nprocs, const std::vector<std::string>& program);

// This program's own command line (/proc/self/exe and /proc/self/cmdline).
std::vector<std::string> own_command_line();

// Replaces this process with `mpirun -np N` running this same program with the
// same arguments and environment. Does not return; throws std::runtime_error if
// mpirun cannot be executed.
[[noreturn]] void relaunch_under_mpirun(int nprocs);

// execvp with a readable error.
[[noreturn]] void exec_command(const std::vector<std::string>& argv);

}  // namespace fabric::launchers
