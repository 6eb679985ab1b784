// Helpers shared by the test suites.
#pragma once

#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include <gtest/gtest.h>

namespace testutil {

// Sets (or unsets, with nullopt) an environment variable for the scope.
class EnvGuard {
 public:
  EnvGuard(std::string name, std::optional<std::string> value) : name_(std::move(name)) {
    if (const char* old = std::getenv(name_.c_str())) previous_ = old;
    if (value) {
      ::setenv(name_.c_str(), value->c_str(), 1);
    } else {
      ::unsetenv(name_.c_str());
    }
  }
  ~EnvGuard() {
    if (previous_) {
      ::setenv(name_.c_str(), previous_->c_str(), 1);
    } else {
      ::unsetenv(name_.c_str());
    }
  }

 private:
  std::string name_;
  std::optional<std::string> previous_;
};

// Runs a shell command, returns its exit status and stdout+stderr.
struct CommandResult {
  int status = -1;
  std::string output;
};
CommandResult run_command(const std::string& command);

// The whole content of a file ("" when it cannot be read).
std::string read_file(const std::string& path);

// The python3 that holds pip's torch (set at build time, overridable by $PYTHON).
std::string python();

// A MASTER_PORT for a multi-process Python (Lightning) run started by a test.
// Lightning's own choice is an ephemeral port it binds, closes and binds again
// seconds later; in between, the test programs that run side by side (their
// TCPStores, Open MPI's connections) may be handed that same port. This one is
// below the kernel's ephemeral range, free when chosen, and differs per call
// and per test process, so nothing else on the machine is given it.
std::string lightning_port();

}  // namespace testutil

// Expects `statement` to throw an exception whose what() contains every string in
// the braced list.
#define EXPECT_THROW_WITH(statement, ...)                                              \
  do {                                                                                 \
    bool thrown_ = false;                                                              \
    try {                                                                              \
      statement;                                                                       \
    } catch (const std::exception& e_) {                                               \
      thrown_ = true;                                                                  \
      const std::string what_ = e_.what();                                             \
      for (const std::string& needle_ : std::vector<std::string>{__VA_ARGS__}) {       \
        EXPECT_NE(what_.find(needle_), std::string::npos)                              \
            << "message lacks \"" << needle_ << "\": " << what_;                       \
      }                                                                                \
    }                                                                                  \
    EXPECT_TRUE(thrown_) << "no exception from " #statement;                           \
  } while (0)
