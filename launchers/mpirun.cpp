#include "launchers/mpirun.h"

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <algorithm>
#include <cstdlib>
#include <iterator>
#include <set>
#include <stdexcept>
#include <unistd.h>

namespace fabric::launchers {

std::vector<std::string> mpirun_command(int nprocs, const std::vector<std::string>& program,
                                        const std::vector<std::string>& flags) {
  std::vector<std::string> argv = {"mpirun", "-np", std::to_string(nprocs), "--bind-to", "none",
                                   "--oversubscribe"};
  if (::geteuid() == 0) argv.push_back("--allow-run-as-root");
  argv.insert(argv.end(), flags.begin(), flags.end());
  argv.insert(argv.end(), program.begin(), program.end());
  return argv;
}

HostList parse_hosts(const std::string& hosts) {
  const std::string valid = "; valid: HOST:N,HOST:N with N ranks on each host, the same N on every host";
  HostList list;
  std::set<std::string> seen;
  std::string first_host;
  size_t start = 0;
  while (start <= hosts.size()) {
    const size_t comma = std::min(hosts.find(',', start), hosts.size());
    const std::string item = hosts.substr(start, comma - start);
    start = comma + 1;
    const size_t colon = item.find(':');
    const std::string host = item.substr(0, colon);
    int ranks = 1;
    if (colon != std::string::npos) {
      const std::string count = item.substr(colon + 1);
      char* end = nullptr;
      const long n = std::strtol(count.c_str(), &end, 10);
      if (count.empty() || *end != '\0' || n < 1 || n > 100000) {
        throw std::invalid_argument("--hosts " + hosts + ": '" + item + "' does not give a number of ranks" + valid);
      }
      ranks = static_cast<int>(n);
    }
    if (host.empty()) throw std::invalid_argument("--hosts '" + hosts + "': an empty host name" + valid);
    if (!seen.insert(host).second) {
      throw std::invalid_argument("--hosts " + hosts + ": " + host + " is named twice" + valid);
    }
    if (list.hosts == 0) {
      list.ranks_per_host = ranks;
      first_host = host;
    } else if (ranks != list.ranks_per_host) {
      throw std::invalid_argument("--hosts " + hosts + ": " + first_host + " runs " +
                                  std::to_string(list.ranks_per_host) + " rank(s) but " + host + " " +
                                  std::to_string(ranks) + valid);
    }
    ++list.hosts;
  }
  return list;
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
