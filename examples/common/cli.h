// Command-line flags shared by the examples, parsed with Boost.Program_options:
// the Fabric flags (--accelerator --devices --strategy --num-nodes --precision) and
// the training-loop flags every example understands.
#pragma once

#include <cstdint>
#include <string>

#include "fabric/options.h"

namespace examples {

struct TrainArgs {
  fabric::FabricOptions fabric;
  int epochs = 5;
  int64_t batch_size = 64;
  int64_t max_steps = -1;  // < 0: no limit
  uint64_t seed = 42;
  double lr = 1e-3;
  std::string checkpoint;
  std::string resume;  // checkpoint to continue from (empty: start fresh)
};

// Parses argv into `defaults` (whose values are shown by --help). Prints help and
// exits 0 for --help; prints the error and exits 2 for a bad flag.
TrainArgs parse_args(int argc, char** argv, const std::string& description, TrainArgs defaults);

}  // namespace examples
