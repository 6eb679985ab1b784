#include "launchers/restarts.h"

#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <regex>
#include <stdexcept>
#include <sys/wait.h>
#include <unistd.h>

#include "launchers/rank_watch.h"
#include "launchers/supervisor.h"

namespace fabric::launchers {
namespace {

// The stop signal received (0: none), and where to forward it.
std::atomic<int> g_stop_signal{0};
std::atomic<pid_t> g_child{0};
std::atomic<Supervisor*> g_supervisor{nullptr};

void stop_handler(int signal) {
  g_stop_signal = signal;
  if (const pid_t child = g_child; child > 0) ::kill(child, signal);
  if (Supervisor* supervisor = g_supervisor) supervisor->signal_all(signal);
}

// Catches SIGINT and SIGTERM while the restart loop runs; the previous
// handlers come back when it ends.
class StopHandlers {
 public:
  StopHandlers() {
    g_stop_signal = 0;
    struct sigaction action {};
    action.sa_handler = stop_handler;
    sigemptyset(&action.sa_mask);
    ::sigaction(SIGINT, &action, &old_int_);
    ::sigaction(SIGTERM, &action, &old_term_);
  }
  ~StopHandlers() {
    ::sigaction(SIGINT, &old_int_, nullptr);
    ::sigaction(SIGTERM, &old_term_, nullptr);
  }

 private:
  struct sigaction old_int_ {}, old_term_ {};
};

std::string describe_status(int status) {
  if (status > 128) {
    return "killed by signal " + std::to_string(status - 128) + " (" + ::strsignal(status - 128) + ")";
  }
  return "exit status " + std::to_string(status);
}

}  // namespace

int restart_count() {
  for (const char* name : {"FABRIC_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT"}) {
    if (const char* value = std::getenv(name); value && *value) {
      try {
        return std::max(0, std::stoi(value));
      } catch (const std::exception&) {
        throw std::invalid_argument(std::string(name) + "='" + value + "' is not a number of restarts");
      }
    }
  }
  return 0;
}

int run_with_restarts(int max_restarts, const std::string& who,
                      const std::function<AttemptOutcome()>& attempt) {
  if (max_restarts < 0) {
    throw std::invalid_argument("max_restarts=" + std::to_string(max_restarts) +
                                " is not supported. Valid values: 0 (no restarts) or more");
  }
  StopHandlers handlers;
  AttemptOutcome outcome;
  for (int count = 0;; ++count) {
    ::setenv("FABRIC_RESTART_COUNT", std::to_string(count).c_str(), 1);
    ::setenv("TORCHELASTIC_RESTART_COUNT", std::to_string(count).c_str(), 1);
    ::setenv("TORCHELASTIC_MAX_RESTARTS", std::to_string(max_restarts).c_str(), 1);
    outcome = attempt();
    if (outcome.status == 0) return 0;
    const std::string failure =
        "attempt " + std::to_string(count + 1) + " of " + std::to_string(max_restarts + 1) + " failed (" +
        (outcome.failure.empty() ? describe_status(outcome.status) : outcome.failure) + ")";
    if (const int signal = g_stop_signal; signal != 0) {
      std::cerr << who << ": " << failure << " after this job received signal " << signal << " ("
                << ::strsignal(signal) << "); not restarting" << std::endl;
      return outcome.status;
    }
    if (count == max_restarts) {
      std::cerr << who << ": " << failure << "; no restarts left (max_restarts=" << max_restarts
                << "), exiting with status " << outcome.status << std::endl;
      return outcome.status;
    }
    std::cerr << who << ": " << failure << "; restarting every rank as attempt " << count + 2
              << " (FABRIC_RESTART_COUNT=" << count + 1 << ")" << std::endl;
  }
}

std::string mpirun_failure(const std::string& text) {
  std::smatch m;
  static const std::regex signaled(
      R"(process rank (\d+) with PID \d+ on node (\S+) exited on signal (\d+) \(([^)]*)\))");
  if (std::regex_search(text, m, signaled)) {
    return "rank " + m[1].str() + " on " + m[2].str() + " was killed by signal " + m[3].str() + " (" +
           m[4].str() + ")";
  }
  static const std::regex exited(R"(Process name:\s+\[\[\d+,\d+\],(\d+)\][\s\S]*?Exit code:\s+(\d+))");
  if (std::regex_search(text, m, exited)) {
    return "rank " + m[1].str() + " exited with status " + m[2].str();
  }
  return "";
}

AttemptOutcome run_mpirun_attempt(const std::vector<std::string>& argv) {
  int fds[2];
  if (::pipe(fds) != 0) throw std::runtime_error(std::string("pipe failed: ") + std::strerror(errno));
  std::cout.flush();
  std::cerr.flush();
  const pid_t pid = ::fork();
  if (pid < 0) throw std::runtime_error(std::string("fork failed: ") + std::strerror(errno));
  if (pid == 0) {
    ::close(fds[0]);
    ::dup2(fds[1], STDERR_FILENO);
    ::close(fds[1]);
    std::vector<char*> raw;
    for (const auto& a : argv) raw.push_back(const_cast<char*>(a.c_str()));
    raw.push_back(nullptr);
    ::execvp(raw[0], raw.data());
    const std::string message = "cannot execute " + argv[0] + ": " + std::strerror(errno) + "\n";
    (void)!::write(STDERR_FILENO, message.data(), message.size());
    ::_exit(127);
  }
  ::close(fds[1]);
  g_child = pid;
  // Only mpirun's own messages are kept for parsing (the ranks' output passes
  // through too; the tail is enough, mpirun reports last).
  // The first rank watcher's line (launchers/rank_watch.h) is kept wherever it
  // comes: it names the rank that failed first even when mpirun's report does not.
  std::string tail, watched;
  char buffer[4096];
  while (true) {
    const ssize_t n = ::read(fds[0], buffer, sizeof(buffer));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    (void)!::write(STDERR_FILENO, buffer, static_cast<size_t>(n));
    const size_t before = tail.size();
    tail.append(buffer, static_cast<size_t>(n));
    if (watched.empty()) {
      const size_t from = before > 256 ? before - 256 : 0;  // a line cut between two reads
      if (tail.find("torchfabric: rank ", from) != std::string::npos) {
        watched = watched_rank_failure(tail.substr(from));
      }
    }
    if (tail.size() > (1 << 16)) tail.erase(0, tail.size() - (1 << 15));
  }
  ::close(fds[0]);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  g_child = 0;
  AttemptOutcome outcome;
  outcome.status = WIFSIGNALED(status) ? 128 + WTERMSIG(status) : WEXITSTATUS(status);
  if (outcome.status != 0) {
    outcome.failure = watched.empty() ? mpirun_failure(tail) : watched;
    if (outcome.failure.empty()) outcome.failure = "mpirun: " + describe_status(outcome.status);
  }
  return outcome;
}

AttemptOutcome run_local_attempt(int nprocs, const std::vector<std::string>& command) {
  return run_supervised_attempt([&](Supervisor& supervisor) {
    const int port = free_port();
    for (int rank = 0; rank < nprocs; ++rank) {
      supervisor.start(rank, command, torchrun_environment(rank, rank, nprocs, nprocs, 0, "127.0.0.1", port));
    }
  });
}

AttemptOutcome run_supervised_attempt(const std::function<void(Supervisor&)>& start_ranks) {
  Supervisor supervisor;
  start_ranks(supervisor);
  g_supervisor = &supervisor;
  AttemptOutcome outcome;
  outcome.status = supervisor.wait_all();
  g_supervisor = nullptr;
  outcome.failure = supervisor.failure();
  return outcome;
}

}  // namespace fabric::launchers
