#include "launchers/mpirun.h"

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <stdexcept>
#include <unistd.h>

namespace fabric::launchers {

std::vector<std::string> mpirun_command(int nprocs, const std::vector<std::string>& program) {
  std::vector<std::string> argv = {"mpirun", "-np", std::to_string(nprocs), "--bind-to", "none",
                                   "--oversubscribe"};
  if (::geteuid() == 0) argv.push_back("--allow-run-as-root");
  argv.insert(argv.end(), program.begin(), program.end());
  return argv;
}

std::vector<std::string> own_command_line() {
  std::ifstream in("/proc/self/cmdline", std::ios::binary);
  std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::string> args;
  size_t start = 0;
  while (start < all.size()) {
    size_t end = all.find('\0', start);
    if (end == std::string::npos) end = all.size();
    args.push_back(all.substr(start, end - start));
    start = end + 1;
  }
  char exe[4096] = {0};
  const ssize_t n = ::readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  if (n > 0 && !args.empty()) args[0] = std::string(exe, static_cast<size_t>(n));
  return args;
}

void exec_command(const std::vector<std::string>& argv) {
  std::vector<char*> raw;
  for (const auto& a : argv) raw.push_back(const_cast<char*>(a.c_str()));
  raw.push_back(nullptr);
  std::cout.flush();
  std::cerr.flush();
  std::fflush(nullptr);
  ::execvp(raw[0], raw.data());
  throw std::runtime_error("cannot execute " + argv[0] + ": " + std::strerror(errno) +
                           (argv[0] == "mpirun" ? " (install Open MPI: apt-get install openmpi-bin)"
                                                : ""));
}

void relaunch_under_mpirun(int nprocs) {
  exec_command(mpirun_command(nprocs, own_command_line()));
}

}  // namespace fabric::launchers
