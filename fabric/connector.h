// The connector turns FabricOptions (and LT_* environment overrides) into the
// concrete accelerator, device list, strategy and precision a Fabric runs with.
// All validation of user-facing options happens here, at construction, so a bad
// value fails before any work starts, with the valid values in the message.
#pragma once

#include <memory>
#include <optional>
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
  // Where the ranks launch() starts belong: this node's place in a job whose
  // launcher started one process per node (srun --ntasks-per-node=1 with
  // devices=G on GPUs), so that node's G ranks are started here. One node: the
  // ranks meet on loopback at a free port (main_address empty).
  struct NodeLaunch {
    int num_nodes = 1;
    int node_rank = 0;
    std::string main_address;
    int main_port = 0;
  } node_launch;
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

// The node's devices, one per local rank, when the launcher gave each task its
// own GPU: srun --gpus-per-task=1 (or --gpu-bind) sets CUDA_VISIBLE_DEVICES to one
// device per task, so a rank sees 1 device where its node runs `local_world_size`
// ranks. Then every rank's device is index 0 of what it sees. Returns nothing when
// the rank sees the node's devices (visible >= local_world_size) or `devices` is a
// list of indices: those are parsed as usual. Throws std::invalid_argument when a
// task sees more than one but fewer than the node's ranks (the fix is in the message).
std::optional<std::vector<c10::Device>> per_task_devices(const Devices& devices,
                                                         int64_t local_world_size,
                                                         int64_t visible, c10::DeviceType type);

}  // namespace fabric
