#include "benchmarks/common/run_command.h"

#include <cstdio>
#include <regex>
#include <stdexcept>

namespace benchmarks {

CommandResult run_command(const std::string& command) {
  FILE* pipe = ::popen((command + " 2>&1").c_str(), "r");
  if (!pipe) throw std::runtime_error("cannot run: " + command);
  CommandResult result;
  char buffer[4096];
  size_t n;
  while ((n = std::fread(buffer, 1, sizeof(buffer), pipe)) > 0) result.output.append(buffer, n);
  result.status = ::pclose(pipe);
  return result;
}

double figure(const CommandResult& result, const std::string& name, const std::string& command) {
  std::smatch match;
  // (name is ours, a literal: "seconds/step", "steps/s", "checksum")
  if (result.status != 0 || !std::regex_search(result.output, match, std::regex(name + ": ([0-9.eE+-]+)"))) {
    throw std::runtime_error("`" + command + "` " +
                             (result.status != 0 ? "failed (status " + std::to_string(result.status) + ")"
                                                 : "printed no '" + name + ": <number>'") +
                             ":\n" + result.output);
  }
  return std::stod(match[1]);
}

double figure(const std::string& command, const std::string& name) {
  return figure(run_command(command), name, command);
}

}  // namespace benchmarks
