// "fsdp": fully sharded data parallel on c10d collectives (Open MPI for CPU
// tensors, NCCL for CUDA), after PyTorch's FSDP with use_orig_params, which is
// what Lightning uses for fabric.setup(model, optimizer).
//
// Units. At setup the model is split into sharding units: modules marked with
// fabric::Sharded, Sequential children chosen by FSDPOptions::auto_wrap_policy,
// and the root (every parameter in no unit). Per unit and dtype the parameters
// are flattened into one buffer padded to a multiple of world_size; each rank
// keeps its 1/world_size slice (the shard). Every parameter keeps its identity
// (module members, user pointers and optimizer state keys stay valid) but,
// between steps, holds only its piece of this rank's shard: a 1-D tensor,
// possibly empty. So an optimizer built over model->parameters() before setup
// allocates state only for this rank's pieces.
//
// A step. The root is gathered when the set-up module's forward starts; a unit
// is gathered when its own forward starts and, under FULL_SHARD, freed when it
// returns (the storage is released, so tensors autograd saved see the data
// again when a hook on the unit's outputs gathers it for the backward). When
// the last gradient of a unit has been accumulated (a hook per parameter counts
// them), its gradients are reduce-scattered (averaged) while the backward goes
// on, the full parameters are freed and each parameter gets its gradient piece.
// Units whose gradients did not all arrive are reduced, in unit order, when
// fabric.backward returns. no_backward_sync keeps full parameters and
// gradients (accumulation); a forward without gradients frees each unit as soon
// as it returns.
//
// Every rank must run the same units in the same order, as under DDP. What
// breaks while parameters are sharded (between steps, outside forward): reading
// a parameter's values or shape, calling a unit's submodule directly (call the
// unit), and Module::to/clone. Inside fabric.save/load and a forward they are
// whole. Mixed precision: gradients are reduced in FSDPOptions::reduce_dtype
// (by default the precision plugin's compute dtype when it is bf16 or fp16,
// Lightning's mapping); parameters are gathered in their own dtype (fp32 under
// "-mixed", where autocast casts them; Lightning gathers them in the compute
// dtype). Under loss scaling ("16-mixed") the strategy gives the plugin's
// GradScaler a found-inf reducer, so every rank skips the same steps.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "strategies/options.h"
#include "strategies/parallel.h"
#include "strategies/sharding_unit.h"

namespace fabric::strategies {

class FSDPStrategy : public ParallelStrategy, private UnitRunner {
 public:
  // Throws std::invalid_argument for an unknown sharding_strategy,
  // reduce_dtype, check_unit_order or state_dict_type.
  FSDPStrategy(Topology topology, ProcessGroupOptions process_group, FSDPOptions options = {});
  // What reduce_dtype "" stands for under a precision plugin: its compute dtype
  // when that is bf16 or fp16, else nullopt (each parameter's own dtype).
  static std::optional<c10::ScalarType> default_reduce_dtype(const precision::Precision& precision);
  ~FSDPStrategy() override;

  // Also derives the reduce dtype (unless options.reduce_dtype names one) and,
  // when sharded, installs the found-inf reducer on the plugin's GradScaler.
  void set_precision(std::shared_ptr<precision::Precision> precision) override;
  // The dtype gradients are reduced in; nullopt: each parameter's own.
  std::optional<c10::ScalarType> reduce_dtype() const { return reduce_dtype_; }

  void setup_module(torch::nn::Module& module) override;
  precision::ScopePtr forward_context(torch::nn::Module& module) override;
  // Also refuses an optimizer that already has state (it would be full-sized).
  void setup_optimizer(torch::optim::Optimizer& optimizer) override;
  at::Tensor optimizer_step(torch::optim::Optimizer& optimizer,
                            const precision::LossClosure& closure) override;
  void backward(const at::Tensor& loss) override;
  // The norm over every rank's gradient pieces (one all-reduce).
  double clip_gradients_norm(torch::nn::Module* module, torch::optim::Optimizer& optimizer,
                             double max_norm, double norm_type, bool error_if_nonfinite) override;
  precision::ScopePtr full_state_context(const std::vector<torch::nn::Module*>& modules,
                                         const std::vector<torch::optim::Optimizer*>& optimizers,
                                         bool loading) override;

  bool sharded_checkpoints() const override { return options_.state_dict_type == "sharded"; }
  // Throws while the parameter's unit is gathered (between a forward and its
  // backward, or during no_backward_sync accumulation): save between steps.
  std::optional<ParameterShard> parameter_shard(const at::Tensor& param) const override;

  const FSDPOptions& options() const { return options_; }
  // Bytes of gathered (full) parameter buffers alive now, and the most at once
  // since the last reset: the strategy's own accounting, for memory tests.
  int64_t gathered_bytes() const { return gathered_bytes_; }
  int64_t peak_gathered_bytes() const { return peak_gathered_bytes_; }
  void reset_peak_gathered_bytes() { peak_gathered_bytes_ = gathered_bytes_; }

  // The sharding units of the set-up modules: dotted path ("" for a root) and
  // the parameter elements each holds (unpadded), in unit order.
  std::vector<std::pair<std::string, int64_t>> units() const;

  struct FlatUnit;  // (fsdp/units.h) one flat, sharded buffer of parameters
  struct Unit;      // (fsdp/units.h) a root or block: its flat buffers and backward state

 private:
  struct ModuleState;
  class StateScope;
  class RootScope;
  class GradReadyHook;
  class PreBackwardHook;
  class PostBackward;
  ModuleState* find(const torch::nn::Module* module);
  Unit* unit_of(const torch::nn::Module& module);
  // UnitRunner: a block unit's forward.
  void pre_forward(torch::nn::Module& unit) override;
  void post_forward(torch::nn::Module& unit, const std::vector<at::Tensor>& outputs) override;
  void forward_failed(torch::nn::Module& unit) override;
  at::Tensor mark_input(torch::nn::Module& unit, const at::Tensor& input) override;
  void begin_forward(Unit& unit, bool for_backward);
  // A forward for backward of `unit` returned, having marked that many inputs.
  void end_forward_for_backward(Unit& unit, size_t marked_inputs,
                                const std::vector<at::Tensor>& outputs);
  // A unit's inputs have their gradients (mark_input's identities ran).
  void post_backward(Unit& unit);
  void reduce_unit(Unit& unit);
  void reshard_unit(Unit& unit);
  void unshard(FlatUnit& unit);
  // Points the parameters back at their pieces and frees the gathered buffer;
  // copy_back first copies this rank's slice of it into the shard (after a load).
  void reshard(FlatUnit& unit, bool copy_back);
  void reduce_gradients(FlatUnit& unit);
  bool sharded() const { return sharding_ != Sharding::kNoShard; }
  enum class Sharding { kFullShard, kShardGradOp, kNoShard };  // sharding_strategy, parsed
  enum class CheckOrder { kFirstStep, kAlways, kNever };        // check_unit_order, parsed
  Sharding sharding_ = Sharding::kFullShard;
  CheckOrder check_order_ = CheckOrder::kFirstStep;

  FSDPOptions options_;
  std::vector<std::unique_ptr<ModuleState>> modules_;
  std::vector<std::shared_ptr<torch::nn::Module>> adapters_;  // auto-wrap installed them
  std::optional<c10::ScalarType> reduce_dtype_;
  precision::GradScaler* reducing_scaler_ = nullptr;  // the scaler our reducer is installed on
  int64_t next_flat_id_ = 0;
  bool stepped_ = false;  // an optimizer step has run (ends check_unit_order="first_step")
  bool in_backward_ = false;  // inside fabric.backward's autograd pass
  int64_t gathered_bytes_ = 0;
  int64_t peak_gathered_bytes_ = 0;
};

}  // namespace fabric::strategies
