// Command-line flags shared by the examples, parsed with Boost.Program_options:
// the Fabric flags (--accelerator --devices --strategy --num-nodes --precision) and
// the training-loop flags every example understands.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "fabric/options.h"
#include "loggers/progress_bar.h"

namespace boost::program_options {
class options_description;
class variables_map;
}  // namespace boost::program_options

namespace fabric {
class Fabric;
}

namespace examples {

// Parses argv against `flags` into `vm` (and the flags' targets). --help prints
// the flags and exits 0; a bad flag prints the error and the flags and exits 2.
// Used by parse_args and by the benchmarks.
void parse_flags(const boost::program_options::options_description& flags, int argc, char** argv,
                 boost::program_options::variables_map& vm);

// An example's main: runs `run`, and turns an exception into "error: ..." on
// stderr and exit status 1.
int run_main(int (*run)(int, char**), int argc, char** argv);

struct TrainArgs {
  fabric::FabricOptions fabric;
  int epochs = 5;
  int64_t batch_size = 64;
  int64_t max_steps = -1;  // < 0: no limit
  uint64_t seed = 42;
  double lr = 1e-3;
  std::string checkpoint;
  // Checkpoint to continue from (empty: start fresh); "auto": the newest one
  // beside --checkpoint (see resume_path), fresh when there is none.
  std::string resume;
  // Logging: parse_args puts one logger per --logger entry into fabric.loggers,
  // writing to log_dir/run_name/version_N (Lightning's layout).
  std::string run_name = "run";
  std::vector<std::string> loggers{"csv"};  // csv, tensorboard or none
  std::string log_dir = "logs";
  int64_t log_every = 50;  // steps between training-loss entries
  fabric::ProgressMode progress = fabric::ProgressMode::kAuto;
};

// A flag one example adds to the shared ones: exactly one of the targets is set;
// an integer flag below `min` is an error naming the flag and the minimum.
struct ExtraFlag {
  std::string name;
  std::string help;
  int64_t* integer = nullptr;
  int64_t min = 1;
  bool* on = nullptr;  // a switch (no value)
  std::string* text = nullptr;
};

// Parses argv into `defaults` (whose values are shown by --help), plus the
// example's own flags (their targets hold the defaults). Prints help and exits 0
// for --help; prints the error and exits 2 for a bad flag.
TrainArgs parse_args(int argc, char** argv, const std::string& description, TrainArgs defaults,
                     const std::vector<ExtraFlag>& extra = {});

// The checkpoint --resume names, after launch(): the path itself, or for "auto"
// the newest file or checkpoint directory in --checkpoint's folder whose name
// starts with --checkpoint's stem ("gpt.pt" matches gpt.pt, gpt-step-100.pt),
// newest by modification time, as rank 0 sees it (every rank gets rank 0's
// choice, so all resume from the same step); "" to start fresh. The pattern that
// makes a job survive a lost rank: --max-restarts N --resume auto.
std::string resume_path(fabric::Fabric& fabric, const TrainArgs& args);

}  // namespace examples
