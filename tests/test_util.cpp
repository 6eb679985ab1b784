#include "test_util.h"

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
  // 20000-28999: below the ephemeral range (32768-60999 by default) and clear of
  // the 29xxx ports that torch's default and some tests use.
  static std::atomic<int> calls{0};
  const int start = static_cast<int>((::getpid() * 97 + calls.fetch_add(1) * 13) % 9000);
  for (int i = 0; i < 9000; ++i) {
    const int port = 20000 + (start + i) % 9000;
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
  return std::to_string(20000 + start);
}

}  // namespace testutil
