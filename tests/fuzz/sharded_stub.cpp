// Stand-ins for the two functions of checkpoint/sharded_checkpoint.cpp that
// read_checkpoint calls for a directory, so checkpoint_fuzz links without the
// strategies (MPI, NCCL) that the real file needs. The fuzz target only reads
// regular files (a memfd), so neither is reached with a real answer.
#include <stdexcept>
#include <string>

// checkpoint/checkpoint.h tests std::is_base_of on these, so they must be complete.
#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>

#include "checkpoint/sharded_checkpoint.h"

namespace fabric {

bool is_sharded_checkpoint(const std::string&) { return false; }

c10::IValue read_sharded_checkpoint(const std::string& dir) {
  throw std::runtime_error("checkpoint_fuzz: sharded checkpoints are not fuzzed (" + dir + ")");
}

}  // namespace fabric
