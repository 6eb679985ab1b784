#include "test_util.h"

#include <algorithm>
#include <array>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <atomic>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

namespace testutil {

CommandResult run_command(const std::string& command) {
  CommandResult result;
  FILE* pipe = ::popen((command + " 2>&1").c_str(), "r");
  if (!pipe) return result;
  std::array<char, 4096> buffer{};
  size_t n;
  while ((n = std::fread(buffer.data(), 1, buffer.size(), pipe)) > 0) {
    result.output.append(buffer.data(), n);
  }
  const int status = ::pclose(pipe);
  result.status = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return result;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream content;
  content << in.rdbuf();
  return content.str();
}

std::string python() {
  if (const char* env = std::getenv("PYTHON"); env && *env) return env;
#ifdef TORCHFABRIC_PYTHON
  return TORCHFABRIC_PYTHON;
#else
  return "python3";
#endif
}

std::string lightning_port() {
  // Below this machine's ephemeral range (net.ipv4.ip_local_port_range, 32768-60999
  // by default) and clear of the 29xxx ports that torch's default and some tests
  // use: 20000 up to the range's start (at most 28999); when fewer than 1000 ports
  // are there, above the range's end. (The policy of
  // strategies::job_rendezvous_port; not called, because example_tests and
  // install_tests link test_util without LibTorch.)
  int low = 32768, high = 60999;
  std::ifstream("/proc/sys/net/ipv4/ip_local_port_range") >> low >> high;
  int first = 20000, count = std::min(low, 29000) - 20000;
  if (count < 1000) {
    first = high + 1;
    count = 65535 - high;
  }
  if (count < 1) return "29500";  // no port outside the range: torch's default
  static std::atomic<int> calls{0};
  const int start = static_cast<int>((::getpid() * 97 + calls.fetch_add(1) * 13) % count);
  for (int i = 0; i < count; ++i) {
    const int port = first + (start + i) % count;
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) break;
    sockaddr_in address{};
    address.sin_family = AF_INET;
    address.sin_addr.s_addr = htonl(INADDR_ANY);
    address.sin_port = htons(static_cast<uint16_t>(port));
    const bool free = ::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0;
    ::close(fd);
    if (free) return std::to_string(port);
  }
  return std::to_string(first + start);
}

}  // namespace testutil
