#include "launchers/rank_watch.h"

#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <regex>
#include <stdexcept>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

namespace fabric::launchers {
namespace {

// The signals a launcher sends to its ranks: forwarded to the program. The
// first four mean "stop": a program that ends after one of them ended as asked.
constexpr int kStopSignals[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT};
constexpr int kOtherSignals[] = {SIGUSR1, SIGUSR2, SIGCONT, SIGTSTP};

std::atomic<pid_t> g_program{0};
std::atomic<bool> g_asked_to_stop{false};

void forward(int signal) {
  for (int stop : kStopSignals) {
    if (signal == stop) g_asked_to_stop = true;
  }
  if (const pid_t program = g_program; program > 0) ::kill(program, signal);
}

std::string rank_name() {
  for (const char* name : {"OMPI_COMM_WORLD_RANK", "PMIX_RANK", "RANK", "SLURM_PROCID"}) {
    if (const char* value = std::getenv(name); value && *value) return value;
  }
  return "?";
}

std::string host_name() {
  char host[256] = {0};
  if (::gethostname(host, sizeof(host) - 1) != 0) return "?";
  return host;
}

void write_stderr(const std::string& text) {
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = ::write(STDERR_FILENO, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
    done += static_cast<size_t>(n);
  }
}

}  // namespace

void watch_rank(const std::vector<std::string>& program) {
  if (program.empty()) throw std::invalid_argument("watch_rank: no program to run");
  std::vector<char*> argv;
  for (const auto& a : program) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  // The handlers are in place before the fork and the signals held until the
  // child's pid is known, so none that arrives meanwhile is lost.
  sigset_t held, previous;
  sigemptyset(&held);
  for (int s : kStopSignals) sigaddset(&held, s);
  for (int s : kOtherSignals) sigaddset(&held, s);
  ::sigprocmask(SIG_BLOCK, &held, &previous);
  struct sigaction action {};
  action.sa_handler = forward;
  sigemptyset(&action.sa_mask);
  for (int s : kStopSignals) ::sigaction(s, &action, nullptr);
  for (int s : kOtherSignals) ::sigaction(s, &action, nullptr);
  int error_pipe[2];
  if (::pipe2(error_pipe, O_CLOEXEC) != 0) {
    throw std::runtime_error(std::string("watch_rank: pipe failed: ") + std::strerror(errno));
  }
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) throw std::runtime_error(std::string("watch_rank: fork failed: ") + std::strerror(errno));
  if (pid == 0) {
    ::close(error_pipe[0]);
    struct sigaction plain {};
    plain.sa_handler = SIG_DFL;
    sigemptyset(&plain.sa_mask);
    for (int s : kStopSignals) ::sigaction(s, &plain, nullptr);
    for (int s : kOtherSignals) ::sigaction(s, &plain, nullptr);
    ::sigprocmask(SIG_SETMASK, &previous, nullptr);
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(137);  // the watcher is already gone
    ::execvp(argv[0], argv.data());
    const int error = errno;
    (void)!::write(error_pipe[1], &error, sizeof(error));
    ::_exit(127);
  }
  ::close(error_pipe[1]);
  g_program = pid;
  ::sigprocmask(SIG_SETMASK, &previous, nullptr);
  int exec_error = 0;
  ssize_t got;
  while ((got = ::read(error_pipe[0], &exec_error, sizeof(exec_error))) < 0 && errno == EINTR) {
  }
  ::close(error_pipe[0]);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (got == static_cast<ssize_t>(sizeof(exec_error))) {
    write_stderr("torchfabric: rank " + rank_name() + " on " + host_name() + " could not start " +
                 program[0] + ": " + std::strerror(exec_error) + "\n");
  }
  const bool signaled = WIFSIGNALED(status);
  const int code = signaled ? 0 : WEXITSTATUS(status);
  if ((signaled || code != 0) && !g_asked_to_stop) {
    const int signal = WTERMSIG(status);
    write_stderr("torchfabric: rank " + rank_name() + " on " + host_name() +
                 (signaled ? " was killed by signal " + std::to_string(signal) + " (" + ::strsignal(signal) + ")"
                           : " exited with status " + std::to_string(code)) +
                 "\n");
  }
  if (signaled) {
    // End by the same signal, so that mpirun reports what the program got.
    const int signal = WTERMSIG(status);
    struct rlimit no_core {0, 0};
    ::setrlimit(RLIMIT_CORE, &no_core);
    struct sigaction plain {};
    plain.sa_handler = SIG_DFL;
    sigemptyset(&plain.sa_mask);
    ::sigaction(signal, &plain, nullptr);
    sigset_t just;
    sigemptyset(&just);
    sigaddset(&just, signal);
    ::sigprocmask(SIG_UNBLOCK, &just, nullptr);
    ::kill(::getpid(), signal);
    ::_exit(128 + signal);
  }
  ::_exit(code);
}

std::string watched_rank_failure(const std::string& text) {
  static const std::regex line(
      R"(torchfabric: rank (\S+) on (\S+) (was killed by signal \d+ \([^)\n]*\)|exited with status \d+(?=\n)))");
  std::smatch m;
  if (!std::regex_search(text, m, line)) return "";
  return "rank " + m[1].str() + " on " + m[2].str() + " " + m[3].str();
}

}  // namespace fabric::launchers
