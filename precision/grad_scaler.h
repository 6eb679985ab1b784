// Dynamic loss scaling for fp16 mixed precision, with the semantics of Python's
// torch.amp.GradScaler: the loss is multiplied by `scale` before backward; before
// the step the gradients are unscaled and checked for inf/nan in one fused kernel
// (at::_amp_foreach_non_finite_check_and_unscale_); a step with non-finite
// gradients is skipped and the scale multiplied by `backoff_factor`; after
// `growth_interval` clean steps in a row it is multiplied by `growth_factor`
// (at::_amp_update_scale_). The scale lives on the loss's device; step() reads the
// inf/nan flag on the host once (to decide, or to learn, whether the step was
// taken). An optimizer that unscales inside its own step
// (precision::AmpScalingStep: fabric::optim::FusedAdam, ...) gets the scale and
// the flag instead of unscaled gradients, as Python's fused optimizers do; on a
// skipped step its gradients stay scaled.
#pragma once

#include <cstdint>
#include <functional>
#include <unordered_map>
#include <vector>

#include <ATen/core/Tensor.h>

namespace torch::optim {
class Optimizer;
}

namespace fabric::precision {

struct GradScalerOptions {
  double init_scale = 65536.0;
  double growth_factor = 2.0;
  double backoff_factor = 0.5;
  int64_t growth_interval = 2000;
  bool enabled = true;
  // DeepSpeed's dynamic loss scaler (strategy="deepspeed"): the scale is lowered
  // only after `hysteresis` overflows in a row (counted again from the next
  // growth), and never below `min_scale`. 1 and 0 are torch.amp's behaviour.
  int64_t hysteresis = 1;
  double min_scale = 0;
};

class GradScaler {
 public:
  explicit GradScaler(GradScalerOptions options = {});

  // loss * scale (creates the scale on the loss's device on first use).
  at::Tensor scale(const at::Tensor& loss);
  // Divides the optimizer's gradients by the scale in place and records whether
  // any is inf/nan. At most once per optimizer between update()s.
  void unscale_(torch::optim::Optimizer& optimizer);
  // The inf/nan check step() needs, done ahead of it (a sharding strategy agrees
  // on the flags in between): unscale_() for most optimizers; for an
  // AmpScalingStep optimizer only the check, its step unscales. Nothing when
  // unscale_() or prepare_step() already ran in this iteration.
  void prepare_step(torch::optim::Optimizer& optimizer);
  // prepare_step() if not yet done, then steps unless an inf/nan was found (an
  // AmpScalingStep optimizer is handed the flag and skips itself).
  // Returns true when the optimizer stepped.
  bool step(torch::optim::Optimizer& optimizer);
  // Updates the scale from this iteration's inf/nan checks; call once per iteration.
  void update();

  double get_scale() const;
  int64_t growth_tracker() const;
  // The inf/nan flags unscale_() or prepare_step() recorded for this optimizer
  // (one float per device; nonzero: found). Empty before either.
  std::vector<at::Tensor>& found_inf(torch::optim::Optimizer& optimizer) {
    return per_optimizer_[&optimizer].found_inf_per_device;
  }
  // Agreement between ranks that each hold only part of the gradients (a
  // sharding strategy installs it): called with this rank's flag (0, or nonzero
  // when its gradients hold inf/nan) after every inf/nan check, on every rank
  // alike, it returns the job's maximum, which replaces the flags; so every rank
  // skips the same steps and the scale stays equal. Empty (the default): the
  // flags stay this process's own. A reducer that throws leaves the check
  // unfinished (the error propagates from unscale_()/step()).
  using FoundInfReducer = std::function<double(double)>;
  void set_found_inf_reducer(FoundInfReducer reducer) { reducer_ = std::move(reducer); }
  bool has_found_inf_reducer() const { return static_cast<bool>(reducer_); }
  // Whether the most recent step() was skipped because of inf/nan gradients.
  bool last_step_skipped() const { return last_step_skipped_; }
  const GradScalerOptions& options() const { return options_; }
  // Replaces the options before the first scale() (a strategy applying its own
  // loss-scaling settings); throws std::logic_error once scaling has begun.
  void set_options(GradScalerOptions options);
  bool is_enabled() const { return options_.enabled; }

  // The scale and growth tracker, for checkpoints: {"scale", "_growth_tracker"}.
  at::Tensor scale_tensor() const { return scale_; }
  at::Tensor growth_tracker_tensor() const { return growth_tracker_; }
  void load(double scale, int64_t growth_tracker);

 private:
  // kChecked: checked for inf/nan, still scaled (an AmpScalingStep optimizer).
  enum class Stage { kReady, kChecked, kUnscaled, kStepped };
  struct OptimizerState {
    Stage stage = Stage::kReady;
    std::vector<at::Tensor> found_inf_per_device;
  };

  void lazy_init(const c10::Device& device);
  // Records the inf/nan flags of the optimizer's gradients; divides them by the
  // scale when `unscale`.
  void check(torch::optim::Optimizer& optimizer, bool unscale);

  GradScalerOptions options_;
  at::Tensor scale_;           // float32, shape [1]
  at::Tensor growth_tracker_;  // int32, shape [1]
  double pending_scale_;
  int64_t pending_tracker_ = 0;
  int64_t hysteresis_left_ = 1;  // overflows in a row still tolerated (options_.hysteresis)
  bool last_step_skipped_ = false;
  FoundInfReducer reducer_;
  std::unordered_map<const torch::optim::Optimizer*, OptimizerState> per_optimizer_;
};

}  // namespace fabric::precision
