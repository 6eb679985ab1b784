// The connector turns FabricOptions (and LT_* environment overrides) into the
// concrete accelerator, device list, strategy and precision a Fabric runs with.
// All validation of user-facing options happens here, at construction, so a bad
// value fails before any work starts, with the valid values in the message.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <c10/core/Device.h>

#include "accelerators/accelerator.h"
#include "fabric/options.h"
#include "launchers/cluster_environment.h"
#include "strategies/topology.h"

namespace fabric {

struct Connection {
  std::shared_ptr<Accelerator> accelerator;
  // This node's devices (one per local rank), num_nodes, and this rank's place.
  strategies::Topology topology;
  std::string strategy;   // resolved, e.g. "single_device"
  std::string precision;  // canonical, e.g. "bf16-mixed"
  launchers::ClusterEnvironment environment;
  // True when nothing launched the other ranks: Fabric::launch() must start them.
  bool needs_launch = false;
  // True when launch() supervises restarting attempts (max_restarts > 0, nothing
  // launched this process); it then starts every rank, rank 0 included.
  bool supervises_restarts = false;
};

// Applies LT_ACCELERATOR, LT_DEVICES, LT_STRATEGY, LT_NUM_NODES, LT_PRECISION to
// `options` the way Lightning does: a set variable wins over the default, and
// conflicts with a non-default value in code are an error when LT_CLI_USED is set
// (i.e. the program was started by a command-line launcher).
FabricOptions apply_environment_overrides(FabricOptions options);

// Resolves everything; throws std::invalid_argument on an invalid or impossible value.
// Under an external launcher, devices="auto" means this node's ranks, num_nodes=1
// (the default) means world / ranks per node, and explicit values must agree with
// the environment.
Connection connect(const FabricOptions& options);

}  // namespace fabric
