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

// The number a program printed after "<name>: " (the benchmarks' workers print
// one figure a line, "seconds/step: 0.0123"). Throws std::runtime_error naming
// `command` and showing its output when it failed or printed no such figure.
double figure(const CommandResult& result, const std::string& name, const std::string& command);
// Runs `command` and returns its figure `name`.
double figure(const std::string& command, const std::string& name);

}  // namespace benchmarks
