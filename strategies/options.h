// Options of the multi-process strategies, in their own structs (FabricOptions
// holds one of each, as `ddp` and `fsdp`). Plain data, no LibTorch headers, so
// fabric/options.h can include it cheaply.
#pragma once

#include <functional>
#include <string>

namespace torch::nn {
class Module;
}

namespace fabric::strategies {

// strategy="ddp", as PyTorch's DistributedDataParallel.
struct DDPOptions {
  // Parameters that get no gradient in a backward count as zero instead of an error.
  bool find_unused_parameters = false;
  // Leave each gradient as a view into its bucket after the sync instead of
  // copying it back: saves one copy of the gradients' memory and time.
  bool gradient_as_bucket_view = false;
  double bucket_cap_mb = 25.0;
  double first_bucket_cap_mb = 1.0;
  // Re-broadcast rank 0's buffers (BatchNorm statistics) before every forward.
  bool broadcast_buffers = true;
};

}  // namespace fabric::strategies
