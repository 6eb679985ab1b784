#include "launchers/supervisor.h"

#include <arpa/inet.h>
#include <csignal>
#include <cstring>
#include <iostream>
#include <netinet/in.h>
#include <stdexcept>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <thread>
#include <unistd.h>

namespace fabric::launchers {
namespace {

Supervisor* g_forward_target = nullptr;

void forward_handler(int signal) {
  if (g_forward_target) g_forward_target->signal_all(signal);
}

std::string describe(int status) {
  if (WIFSIGNALED(status)) {
    return std::string("was killed by signal ") + std::to_string(WTERMSIG(status)) + " (" +
           ::strsignal(WTERMSIG(status)) + ")";
  }
  return "exited with status " + std::to_string(WEXITSTATUS(status));
}

}  // namespace

void Supervisor::start(int rank, const std::vector<std::string>& argv,
                       const std::map<std::string, std::string>& env) {
  if (argv.empty()) throw std::invalid_argument("Supervisor::start: empty command");
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) throw std::runtime_error(std::string("fork failed: ") + std::strerror(errno));
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (::getppid() != parent) ::_exit(1);  // the parent died before prctl
    // Its own process group, so stopping a rank also stops what it started.
    ::setpgid(0, 0);
    for (const auto& [key, value] : env) ::setenv(key.c_str(), value.c_str(), 1);
    std::vector<char*> raw;
    for (const auto& a : argv) raw.push_back(const_cast<char*>(a.c_str()));
    raw.push_back(nullptr);
    ::execvp(raw[0], raw.data());
    std::cerr << "rank " << rank << ": cannot execute " << argv[0] << ": " << std::strerror(errno)
              << std::endl;
    ::_exit(127);
  }
  pids_.push_back(pid);
  ranks_.push_back(rank);
  running_.push_back(true);
}

void Supervisor::signal_all(int signal) {
  for (size_t i = 0; i < pids_.size(); ++i) {
    if (running_[i]) {
      if (::kill(-pids_[i], signal) != 0) ::kill(pids_[i], signal);
    }
  }
}

void Supervisor::forward_signals() {
  g_forward_target = this;
  struct sigaction action {};
  action.sa_handler = forward_handler;
  sigemptyset(&action.sa_mask);
  ::sigaction(SIGINT, &action, nullptr);
  ::sigaction(SIGTERM, &action, nullptr);
}

std::optional<std::pair<size_t, int>> Supervisor::reap_one() {
  // Only our own pids, one at a time (waitpid(-1) would also reap the program's
  // other children, making its system()/pclose() fail with ECHILD).
  for (size_t i = 0; i < pids_.size(); ++i) {
    if (!running_[i]) continue;
    int status = 0;
    pid_t done = 0;
    do {
      done = ::waitpid(pids_[i], &status, WNOHANG);
    } while (done < 0 && errno == EINTR);
    if (done == pids_[i] || (done < 0 && errno == ECHILD)) {
      running_[i] = false;
      if (done < 0) status = 0;  // someone else reaped it; its status is lost
      return std::make_pair(i, status);
    }
  }
  return std::nullopt;
}

size_t Supervisor::running() const {
  size_t n = 0;
  for (bool r : running_) n += r ? 1 : 0;
  return n;
}

int Supervisor::wait_all() {
  int result = 0;
  bool stopping = false;
  std::chrono::steady_clock::time_point kill_at;
  while (running() > 0) {
    if (stop_requested_ && !stopping) {  // request_stop(): end them all, quietly
      stopping = true;
      signal_all(SIGTERM);
      kill_at = std::chrono::steady_clock::now() + grace_;
    }
    if (stopping && std::chrono::steady_clock::now() >= kill_at) signal_all(SIGKILL);
    auto done = reap_one();
    if (!done) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      continue;
    }
    const auto [i, status] = *done;
    const bool failed = WIFSIGNALED(status) || WEXITSTATUS(status) != 0;
    if (stopping || !failed || result != 0) continue;
    result = WIFSIGNALED(status) ? 128 + WTERMSIG(status) : WEXITSTATUS(status);
    failure_ = "rank " + std::to_string(ranks_[i]) + " (pid " + std::to_string(pids_[i]) + ") " +
               describe(status);
    // One write, so messages of several supervisors do not interleave.
    const std::string message = "torchfabric: " + failure_ + "; stopping the other ranks\n";
    (void)!::write(STDERR_FILENO, message.data(), message.size());
    signal_all(SIGTERM);
    // Give them the grace period, then SIGKILL whoever is left.
    const auto deadline = std::chrono::steady_clock::now() + grace_;
    while (running() > 0 && std::chrono::steady_clock::now() < deadline) {
      if (!reap_one()) std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    signal_all(SIGKILL);
  }
  return result;
}

std::map<std::string, std::string> torchrun_environment(int global_rank, int local_rank,
                                                        int world_size, int local_world_size,
                                                        int node_rank,
                                                        const std::string& main_address,
                                                        int main_port) {
  return {{"RANK", std::to_string(global_rank)},
          {"LOCAL_RANK", std::to_string(local_rank)},
          {"WORLD_SIZE", std::to_string(world_size)},
          {"LOCAL_WORLD_SIZE", std::to_string(local_world_size)},
          {"NODE_RANK", std::to_string(node_rank)},
          {"GROUP_RANK", std::to_string(node_rank)},
          {"MASTER_ADDR", main_address},
          {"MASTER_PORT", std::to_string(main_port)}};
}

int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) throw std::runtime_error("cannot open a socket to find a free port");
  sockaddr_in addr {};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    ::close(fd);
    throw std::runtime_error("cannot find a free port");
  }
  const int port = ntohs(addr.sin_port);
  ::close(fd);
  return port;
}

}  // namespace fabric::launchers
