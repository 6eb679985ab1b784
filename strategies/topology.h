// Where this rank sits in the job: the one place rank and world facts live.
// The connector fills it from the options and the cluster environment; strategies
// and Fabric read it.
#pragma once

#include <cstdint>
#include <vector>

#include <c10/core/Device.h>

namespace fabric::strategies {

struct Topology {
  std::vector<c10::Device> parallel_devices;  // this node's devices, one per local rank
  int num_nodes = 1;
  int64_t global_rank = 0;
  int64_t local_rank = 0;
  int64_t node_rank = 0;
  int64_t world_size = 1;
};

}  // namespace fabric::strategies
