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
// `flags` go to mpirun before the program (e.g. -H hosts, -x VARIABLE).
std::vector<std::string> mpirun_command(int nprocs, const std::vector<std::string>& program,
                                        const std::vector<std::string>& flags = {});

// A job across hosts in mpirun's -H form, "hostA:2,hostB:2" (a bare host is one
// rank): every host must run the same number of ranks (Lightning's devices per
// node). Throws std::invalid_argument naming the item that is wrong.
struct HostList {
  int hosts = 0;
  int ranks_per_host = 0;
};
HostList parse_hosts(const std::string& hosts);

// This program's own command line (/proc/self/exe and /proc/self/cmdline).
std::vector<std::string> own_command_line();

// Replaces this process with `mpirun -np N` running this same program with the
// same arguments and environment. Does not return; throws std::runtime_error if
// mpirun cannot be executed.
[[noreturn]] void relaunch_under_mpirun(int nprocs);

// execvp with a readable error.
[[noreturn]] void exec_command(const std::vector<std::string>& argv);

}  // namespace fabric::launchers
