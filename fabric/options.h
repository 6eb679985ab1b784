// Options accepted by fabric::Fabric, mirroring Lightning Fabric's constructor.
//
// Every field has the default Lightning uses, so `Fabric()` runs on one device in
// fp32, and designated initializers read like the Python call:
//   fabric::Fabric fabric({.accelerator = "cpu", .precision = "bf16-mixed"});
// The values are validated when the Fabric is constructed (see connector.h); the
// environment variables LT_ACCELERATOR, LT_DEVICES, LT_STRATEGY, LT_NUM_NODES and
// LT_PRECISION override them, as Lightning's `fabric run` does.
#pragma once

#include <chrono>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "accelerators/devices.h"
#include "strategies/options.h"

namespace fabric {

namespace precision {
class Precision;
}
namespace strategies {
class Strategy;
}
class Callback;
class Logger;

// `precision`: a name ("bf16-mixed") or one of Lightning's integer aliases (32, 64, 16).
class PrecisionArg {
 public:
  PrecisionArg() = default;
  PrecisionArg(const char* name) : name_(name) {}          // NOLINT
  PrecisionArg(std::string name) : name_(std::move(name)) {}  // NOLINT
  PrecisionArg(int bits) : name_(std::to_string(bits)) {}  // NOLINT
  const std::string& str() const { return name_; }

 private:
  std::string name_ = "32-true";
};

struct FabricOptions {
  // "auto" (cuda when a GPU is visible, else cpu), "cpu", "cuda", "gpu" (= cuda).
  std::string accelerator = "auto";
  // "auto" (single_device for a world of one, else ddp), "single_device", "ddp",
  // "fsdp" (fully sharded: see strategies/fsdp/fsdp.h), "deepspeed" (ZeRO stage 2)
  // "deepspeed_stage_{1,2,3}[_offload]" (strategies/deepspeed/deepspeed.h),
  // "model_parallel" (tensor x data parallel: strategies/model_parallel/), or a name the program added
  // with strategies::register_strategy (strategies/registry.h).
  std::string strategy = "auto";
  // A ready-made strategy object (Lightning's `strategy=` given an instance);
  // replaces `strategy`, which must then be "auto" or its name. It must have been
  // built for this job: its world size must be the one devices x num_nodes give.
  std::shared_ptr<strategies::Strategy> strategy_plugin;
  Devices devices = "auto";
  int num_nodes = 1;
  // "32-true", "64-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true" and the
  // aliases 32, 64, 16 ("16-mixed"), "bf16" ("bf16-mixed").
  PrecisionArg precision = "32-true";
  // A ready-made precision plugin (Lightning's `plugins=`); replaces `precision`.
  // Use it for a GradScaler with non-default settings or fp16 AMP on the CPU.
  std::shared_ptr<precision::Precision> precision_plugin;
  std::vector<std::shared_ptr<Callback>> callbacks;
  std::vector<std::shared_ptr<Logger>> loggers;
  // Multi-process options. Backend: "nccl" (CUDA, the default there), "mpi"
  // (CPU, the default there); "gloo" is named but not built.
  std::string process_group_backend;
  // How long the rendezvous waits for every rank to arrive (and a rank for the
  // store of rank 0).
  std::chrono::seconds timeout = std::chrono::minutes(30);
  // Stall detection: a collective that has not completed within this time ends the
  // job with a message naming it, its sequence number and the ranks that had not
  // entered it (mpi backend: our watchdog; nccl: ProcessGroupNCCL's watchdog with
  // this timeout, which names the collective and sequence number). 0: off, a
  // collective waits forever. Allow for the longest legitimate wait: a rank that
  // saves a large checkpoint while the others wait in the next collective.
  std::chrono::seconds collective_timeout = std::chrono::minutes(10);
  // When Fabric starts the ranks itself (launch() in a program nothing launched,
  // one process included): how many times a job whose rank died is started again
  // (torchrun's --max-restarts, launchers/restarts.h). The process that called
  // launch() then only supervises and exits with the job's status; the ranks of
  // each attempt see FABRIC_RESTART_COUNT and should resume from their newest
  // checkpoint. Under an external launcher that launcher decides (fabric-run
  // --max-restarts); a value here is then not applied, and rank 0 says so.
  int max_restarts = 0;
  // Options of strategy "ddp" (find_unused_parameters, gradient_as_bucket_view,
  // bucket sizes, broadcast_buffers); ignored by the other strategies.
  strategies::DDPOptions ddp;
  // Options of strategy "fsdp" (sharding_strategy, state_dict_type).
  strategies::FSDPOptions fsdp;
  // Options of the deepspeed strategies (stage, offload, bucket sizes, loss
  // scaling, `config`: a DeepSpeed JSON file); see strategies/deepspeed/deepspeed.h.
  strategies::DeepSpeedOptions deepspeed;
  // Options of strategy "model_parallel" (the mesh's tensor_parallel_size and
  // data_parallel_size, what the data-parallel dimension runs); see
  // strategies/model_parallel/model_parallel.h.
  strategies::ModelParallelOptions model_parallel;
  // Keep freed host memory in the process for the next step instead of handing it
  // back to the system between steps (accelerators/cpu_memory.h): no page faults on
  // reused activation memory, and a resident size that stays near its peak.
  // Process-wide and lasting, applied when the Fabric is constructed; the user's
  // MALLOC_*_ environment variables or glibc.malloc tunables, when set, win.
  bool retain_cpu_memory = true;
};

}  // namespace fabric
