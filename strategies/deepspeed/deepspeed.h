// strategy="deepspeed": torchfabric's own implementation of DeepSpeed's ZeRO
// stages (DeepSpeed has no C++ API), under Lightning's names:
//   deepspeed (stage 2), deepspeed_stage_1, deepspeed_stage_2, deepspeed_stage_3,
//   each also with _offload (fp32 master weights and optimizer state in host memory).
//
// Stages 1 and 2 (ZeRODataParallel below). Parameters stay whole on every rank, so
// forward and backward need no gathers. At setup the trainable parameters are
// packed into flat buckets (reverse registration order, the order backward
// produces gradients; one dtype each, at most reduce_bucket_size elements, padded
// to a multiple of the world size) and become views of them; rank r owns the
// r-th 1/N of every bucket. The optimizer does not step the module's parameters
// but this rank's pieces of them (fabric.setup swaps them into its groups): the
// pieces alias the flat buffer, or, under half precision or offload, are fp32
// master copies (in host memory with offload). So optimizer state is 1/N.
// In backward a hook per parameter copies its gradient into its bucket; a full
// bucket is reduced at once, buckets in order on every rank: stage 1 all-reduces
// it (the averaged full gradients stay readable in param.grad until the next
// backward), stage 2 reduce-scatters it, and each rank keeps only its slice
// (gradient memory 1/N). The pieces' gradients accumulate across synced backwards
// until optimizer.zero_grad(); no_backward_sync accumulates full gradients in
// param.grad (the next synced backward reduces their sum). A parameter with no
// gradient on a rank counts as zeros there (DeepSpeed's rule: no unused-parameter
// error). After the step each bucket's slices are all-gathered back into the
// whole parameters, at most allgather_bucket_size elements in flight.
//
// Stage 3 is FSDP's FULL_SHARD (strategies/fsdp/fsdp.h) under this name, with
// fp32 master weights (and their offload) over its pieces.
//
// Checkpoints: inside fabric.save/load the optimizer shows the module's
// parameters and full-sized state again, so the file is the one DDP writes
// and loads into any strategy (and any strategy's file loads here). With
// state_dict_type="sharded" each rank writes its pieces of the optimizer state
// into a DCP directory keyed by the parameters' names (and reads only them).
#pragma once

#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "strategies/fsdp/fsdp.h"
#include "strategies/options.h"
#include "strategies/parallel.h"

namespace fabric::strategies {

// Builds the strategy a deepspeed name stands for: reads options.config (or
// PL_DEEPSPEED_CONFIG_PATH) first. Throws std::invalid_argument for
// deepspeed_stage_3_offload_nvme, a name whose stage the config contradicts,
// and bad config values.
std::shared_ptr<Strategy> make_deepspeed_strategy(const std::string& name, Topology topology,
                                                  ProcessGroupOptions process_group,
                                                  DeepSpeedOptions options);

// The names above with what each does, for the registry.
struct DeepSpeedName {
  const char* name;
  int stage;
  bool offload;
  const char* description;
};
const std::vector<DeepSpeedName>& deepspeed_names();

// ZeRO stages 1 and 2.
class ZeRODataParallel : public ParallelStrategy {
 public:
  // What the config file said beyond the options: its precision flags (checked
  // in set_precision), and the warning about keys without effect (printed by
  // rank 0 when the ranks start, not by a process that only spawns them).
  struct FromConfig {
    std::optional<bool> fp16, bf16;
    std::string warning;
  };
  ZeRODataParallel(std::string name, Topology topology, ProcessGroupOptions process_group,
                   DeepSpeedOptions options, FromConfig from_config = {});
  ~ZeRODataParallel() override;
  void setup_environment() override;

  // Also applies the loss-scaling options to the plugin's GradScaler and makes
  // the ranks agree on inf/nan (each checks only its pieces).
  void set_precision(std::shared_ptr<precision::Precision> precision) override;
  void setup_module(torch::nn::Module& module) override;
  // Swaps the optimizer's parameters for this rank's pieces; refuses one with
  // state, or a trainable parameter of no module set up here.
  void setup_optimizer(torch::optim::Optimizer& optimizer) override;
  // Clips (config gradient_clipping), steps the pieces, copies masters back,
  // all-gathers the updated parameters.
  at::Tensor optimizer_step(torch::optim::Optimizer& optimizer,
                            const precision::LossClosure& closure) override;
  void backward(const at::Tensor& loss) override;
  // The norm over every rank's gradient pieces (one all-reduce).
  double clip_gradients_norm(torch::nn::Module* module, torch::optim::Optimizer& optimizer,
                             double max_norm, double norm_type, bool error_if_nonfinite) override;
  precision::ScopePtr full_state_context(const std::vector<torch::nn::Module*>& modules,
                                         const std::vector<torch::optim::Optimizer*>& optimizers,
                                         bool loading) override;
  // state_dict_type="sharded": a DCP directory in which the (whole) parameters
  // are written once and each rank writes its pieces of the optimizer state.
  bool sharded_checkpoints() const override { return options_.state_dict_type == "sharded"; }
  // A piece: where it lies in its parameter; a module parameter: nullopt (whole).
  std::optional<ParameterShard> parameter_shard(const at::Tensor& tensor) const override;
  at::Tensor parameter_of(const at::Tensor& optimizer_tensor) const override;
  // After a sharded load, the fp32 masters start again from the parameters.
  precision::ScopePtr sharded_state_context(const std::vector<torch::nn::Module*>& modules,
                                            const std::vector<torch::optim::Optimizer*>& optimizers,
                                            bool loading) override;

  const DeepSpeedOptions& options() const { return options_; }
  const FromConfig& from_config() const { return from_config_; }
  int stage() const { return options_.stage; }
  // Whether the optimizer steps fp32 master copies (half precision or offload).
  bool uses_master_weights() const { return masters_; }
  // Bytes of gradients this strategy holds now (buckets, pieces' and full
  // gradients, each storage once), for memory tests and benchmarks.
  int64_t gradient_bytes() const;
  // Number of buckets of each set-up module, for tests.
  std::vector<size_t> bucket_counts() const;

  struct Bucket;       // (zero.cpp)
  struct ModuleState;  // (zero.cpp)
  class StateScope;    // (zero_state.cpp)

 private:
  void launch_ready(ModuleState& state);
  void finish_sync(ModuleState& state);
  // The piece that stands for `param` in an optimizer, or null.
  struct Owner {
    ModuleState* state;
    size_t bucket, index;
  };
  const Owner* owner_of(const at::Tensor& param) const;
  void refresh_masters();

  DeepSpeedOptions options_;
  FromConfig from_config_;
  bool masters_ = false;  // decided at the first setup_module (from the parameters' dtype)
  bool in_backward_ = false;
  std::vector<std::unique_ptr<ModuleState>> modules_;
  // Each set-up optimizer: the buckets its pieces lie in, in bucket order.
  std::unordered_map<const torch::optim::Optimizer*, std::vector<std::pair<ModuleState*, size_t>>> optimizers_;
  std::unordered_map<const void*, Owner> owners_;  // model parameter or piece -> where it lies
  precision::GradScaler* reducing_scaler_ = nullptr;
};

// ZeRO stage 3: FSDP FULL_SHARD under the deepspeed names (the stage's own
// options: bucket sizes are FSDP's units here).
//
// fp32 master weights (offload_optimizer, or parameters in bf16/fp16): the
// optimizer steps fp32 copies of this rank's parameter pieces (in host memory
// with offload, pinned on CUDA); after each synced backward the pieces'
// gradients move into the masters' (so optimizer.zero_grad() clears them), and
// after the step the pieces get the masters' values in their own dtype. The
// parameters themselves stay on the device (offload_parameters beyond that is
// not implemented on CUDA: an error).
class DeepSpeedStage3 : public FSDPStrategy {
 public:
  DeepSpeedStage3(std::string name, Topology topology, ProcessGroupOptions process_group,
                  DeepSpeedOptions options, FSDPOptions fsdp,
                  ZeRODataParallel::FromConfig from_config = {});
  void setup_environment() override;
  // FSDP's, then the loss-scaling options and the config's precision check.
  void set_precision(std::shared_ptr<precision::Precision> precision) override;
  void setup_optimizer(torch::optim::Optimizer& optimizer) override;
  void backward(const at::Tensor& loss) override;
  // Clips to the config's gradient_clipping first; copies masters back after.
  at::Tensor optimizer_step(torch::optim::Optimizer& optimizer,
                            const precision::LossClosure& closure) override;
  precision::ScopePtr full_state_context(const std::vector<torch::nn::Module*>& modules,
                                         const std::vector<torch::optim::Optimizer*>& optimizers,
                                         bool loading) override;
  // A master answers as the parameter it stands for.
  std::optional<ParameterShard> parameter_shard(const at::Tensor& tensor) const override;
  at::Tensor parameter_of(const at::Tensor& optimizer_tensor) const override;
  precision::ScopePtr sharded_state_context(const std::vector<torch::nn::Module*>& modules,
                                            const std::vector<torch::optim::Optimizer*>& optimizers,
                                            bool loading) override;
  const DeepSpeedOptions& deepspeed_options() const { return deepspeed_; }
  bool uses_master_weights() const { return !masters_.empty(); }

 private:
  class MasterScope;
  struct Master {
    at::Tensor param;   // the module's parameter (between steps: its piece)
    at::Tensor master;  // what the optimizer steps
  };
  const Master* master_of(const at::Tensor& tensor) const;
  void refresh_masters();
  DeepSpeedOptions deepspeed_;
  ZeRODataParallel::FromConfig from_config_;
  std::unordered_map<const torch::optim::Optimizer*, std::vector<Master>> masters_;
};

// Prints the config's warning (from_config.warning) on global rank 0.
void warn_about_config(const ZeRODataParallel::FromConfig& from_config, int64_t global_rank);
// The config's precision flags against the plugin (an error naming both when
// they disagree), and DeepSpeed's loss-scaling options on its GradScaler.
void apply_deepspeed_precision(const std::string& strategy, const DeepSpeedOptions& options,
                               const ZeRODataParallel::FromConfig& config,
                               precision::Precision& plugin);

}  // namespace fabric::strategies
