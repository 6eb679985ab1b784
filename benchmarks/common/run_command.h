// Runs a shell command and captures what it prints: the benchmarks start their
// workers (and Python's side) this way and read the figures from the output.
#pragma once

#include <string>

namespace benchmarks {

struct CommandResult {
  int status = -1;     // as pclose returns it
  std::string output;  // stdout and stderr
};

CommandResult run_command(const std::string& command);

}  // namespace benchmarks
