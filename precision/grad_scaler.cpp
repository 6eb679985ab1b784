#include "precision/grad_scaler.h"

#include <algorithm>
#include <map>
#include <stdexcept>
#include <utility>

#include <ATen/ops/_amp_foreach_non_finite_check_and_unscale.h>
#include <ATen/ops/_amp_update_scale.h>
#include <ATen/ops/full.h>
#include <ATen/ops/maximum.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/zeros.h>
#include <torch/optim/optimizer.h>

#include "precision/amp_scaling_step.h"

namespace fabric::precision {

GradScaler::GradScaler(GradScalerOptions options)
    : options_(options), pending_scale_(options.init_scale), hysteresis_left_(options.hysteresis) {
  if (!(options.init_scale > 0)) {
    throw std::invalid_argument("GradScaler: init_scale must be > 0, got " +
                                std::to_string(options.init_scale));
  }
  if (!(options.growth_factor > 1.0)) {
    throw std::invalid_argument("GradScaler: growth_factor must be > 1.0, got " +
                                std::to_string(options.growth_factor));
  }
  if (!(options.backoff_factor > 0.0 && options.backoff_factor < 1.0)) {
    throw std::invalid_argument("GradScaler: backoff_factor must be in (0, 1), got " +
                                std::to_string(options.backoff_factor));
  }
  if (options.growth_interval < 1) {
    throw std::invalid_argument("GradScaler: growth_interval must be >= 1, got " +
                                std::to_string(options.growth_interval));
  }
}

void GradScaler::lazy_init(const c10::Device& device) {
  if (scale_.defined()) return;
  scale_ = at::full({1}, pending_scale_, at::TensorOptions().dtype(at::kFloat).device(device));
  growth_tracker_ =
      at::full({1}, pending_tracker_, at::TensorOptions().dtype(at::kInt).device(device));
}

at::Tensor GradScaler::scale(const at::Tensor& loss) {
  if (!options_.enabled) return loss;
  lazy_init(loss.device());
  return loss.mul(scale_.to(loss.device(), /*non_blocking=*/true));
}

void GradScaler::unscale_(torch::optim::Optimizer& optimizer) {
  if (!options_.enabled) return;
  const auto stage = per_optimizer_[&optimizer].stage;
  if (stage == Stage::kUnscaled) {
    throw std::logic_error(
        "GradScaler: unscale_() was already called on this optimizer since the last "
        "update() (or prepare_step() unscaled its gradients); gradients would be unscaled "
        "twice");
  }
  if (stage == Stage::kStepped) {
    throw std::logic_error("GradScaler: unscale_() was called after step() in the same iteration");
  }
  check(optimizer, /*unscale=*/true);
}

void GradScaler::prepare_step(torch::optim::Optimizer& optimizer) {
  if (!options_.enabled) return;
  const auto stage = per_optimizer_[&optimizer].stage;
  if (stage == Stage::kStepped) {
    throw std::logic_error(
        "GradScaler: step() was already called on this optimizer since the last update()");
  }
  if (stage != Stage::kReady) return;
  check(optimizer, /*unscale=*/dynamic_cast<AmpScalingStep*>(&optimizer) == nullptr);
}

void GradScaler::check(torch::optim::Optimizer& optimizer, bool unscale) {
  if (!scale_.defined()) {
    throw std::logic_error(
        "GradScaler: unscale_() or step() called before any loss was scaled; call "
        "fabric.backward(loss) first");
  }
  const auto inv_scale = unscale ? scale_.to(at::kDouble).reciprocal().to(at::kFloat)
                                 : at::ones_like(scale_);

  // The fused kernel wants gradients of one device and dtype per call.
  std::map<std::pair<std::string, int>, std::vector<at::Tensor>> groups;
  std::map<std::string, c10::Device> devices;
  for (const auto& group : optimizer.param_groups()) {
    for (const auto& param : group.params()) {
      const auto& grad = param.grad();
      if (!grad.defined()) continue;
      if (grad.is_sparse()) {
        throw std::invalid_argument("GradScaler: sparse gradients are not supported");
      }
      if (grad.scalar_type() == at::kHalf) {
        throw std::invalid_argument(
            "GradScaler: attempting to unscale fp16 gradients. Under '16-mixed' the "
            "parameters must stay float32; use precision '16-true' for an all-fp16 model "
            "(which has no loss scaling)");
      }
      const auto key = std::make_pair(grad.device().str(), static_cast<int>(grad.scalar_type()));
      groups[key].push_back(grad);
      devices.emplace(grad.device().str(), grad.device());
    }
  }
  std::map<std::string, at::Tensor> found_inf;
  for (const auto& [name, device] : devices) {
    found_inf[name] = at::zeros({1}, at::TensorOptions().dtype(at::kFloat).device(device));
  }
  for (auto& [key, grads] : groups) {
    auto& found = found_inf.at(key.first);
    at::_amp_foreach_non_finite_check_and_unscale_(grads, found, inv_scale.to(found.device()));
  }
  // Flags recorded earlier in this iteration (unscale_() after prepare_step() on an
  // AmpScalingStep optimizer) are kept and only widened by this check.
  auto& state = per_optimizer_[&optimizer];
  const auto previous = std::move(state.found_inf_per_device);
  state.found_inf_per_device.clear();
  for (auto& [name, found] : found_inf) state.found_inf_per_device.push_back(found);
  for (size_t i = 0; i < previous.size() && i < state.found_inf_per_device.size(); ++i) {
    auto& found = state.found_inf_per_device[i];
    found = at::maximum(found, previous[i].to(found.device()));
  }
  if (reducer_) {
    // Called even with no gradients here (a rank whose pieces are all empty), so
    // that every rank takes part in the same agreements.
    double local = 0;
    for (const auto& f : state.found_inf_per_device) local = std::max(local, f.item<double>());
    const double agreed = reducer_(local);
    for (auto& f : state.found_inf_per_device) f.fill_(agreed);
  }
  state.stage = unscale ? Stage::kUnscaled : Stage::kChecked;
}

bool GradScaler::step(torch::optim::Optimizer& optimizer) {
  if (!options_.enabled) {
    optimizer.step();
    last_step_skipped_ = false;
    return true;
  }
  prepare_step(optimizer);
  auto& current = per_optimizer_[&optimizer];
  if (current.found_inf_per_device.empty()) {
    throw std::logic_error(
        "GradScaler: no gradients were found for this optimizer; run fabric.backward(loss) "
        "before optimizer.step()");
  }
  // One flag over the devices, 1 where any found inf/nan (the fused kernels skip
  // on exactly 1).
  at::Tensor found = current.found_inf_per_device[0].to(scale_.device());
  for (size_t i = 1; i < current.found_inf_per_device.size(); ++i) {
    found = at::maximum(found, current.found_inf_per_device[i].to(scale_.device()));
  }
  if (auto* fused = dynamic_cast<AmpScalingStep*>(&optimizer)) {
    // The kernel divides by the scale (unless unscale_() already did) and skips
    // itself on inf/nan.
    last_step_skipped_ =
        !fused->step_with_amp_scaling(current.stage == Stage::kChecked ? scale_ : at::Tensor(), found);
  } else {
    last_step_skipped_ = found.item<double>() != 0;
    if (!last_step_skipped_) optimizer.step();
  }
  current.stage = Stage::kStepped;
  return !last_step_skipped_;
}

void GradScaler::update() {
  if (!options_.enabled) return;
  if (!scale_.defined()) return;  // nothing was scaled yet
  std::vector<at::Tensor> found;
  for (auto& [opt, state] : per_optimizer_) {
    for (auto& f : state.found_inf_per_device) found.push_back(f.to(scale_.device()));
  }
  if (found.empty()) {
    throw std::logic_error(
        "GradScaler: update() called without any inf/nan check since the last update(); "
        "call step() (or unscale_()) first");
  }
  auto combined = found[0];
  for (size_t i = 1; i < found.size(); ++i) combined = combined.add(found[i]);
  if (options_.hysteresis > 1 || options_.min_scale > 0) {
    // DeepSpeed's rule, on the host (one read of the flag, as DeepSpeed does).
    const bool overflow = combined.item<double>() != 0;
    double scale = scale_.item<double>();
    int64_t tracker = growth_tracker_.item<int64_t>();
    if (overflow) {
      tracker = 0;
      if (hysteresis_left_ <= 1) {
        scale = std::max(scale * options_.backoff_factor, options_.min_scale);
      } else {
        --hysteresis_left_;
      }
    } else if (++tracker >= options_.growth_interval) {
      scale *= options_.growth_factor;
      tracker = 0;
      hysteresis_left_ = options_.hysteresis;
    }
    scale_.fill_(scale);
    growth_tracker_.fill_(tracker);
    per_optimizer_.clear();
    return;
  }
  at::_amp_update_scale_(scale_, growth_tracker_, combined, options_.growth_factor,
                         options_.backoff_factor, options_.growth_interval);
  per_optimizer_.clear();
}

double GradScaler::get_scale() const {
  if (!options_.enabled) return 1.0;
  return scale_.defined() ? scale_.item<double>() : pending_scale_;
}

int64_t GradScaler::growth_tracker() const {
  return growth_tracker_.defined() ? growth_tracker_.item<int64_t>() : pending_tracker_;
}

void GradScaler::set_options(GradScalerOptions options) {
  if (scale_.defined()) {
    throw std::logic_error("GradScaler: set_options() after scaling began; set the options before the "
                           "first backward");
  }
  if (options.hysteresis < 1 || options.min_scale < 0 || options.init_scale <= 0 ||
      options.growth_interval < 1) {
    throw std::invalid_argument(
        "GradScaler: hysteresis and growth_interval must be >= 1, init_scale > 0, min_scale >= 0");
  }
  options_ = options;
  pending_scale_ = options.init_scale;
  pending_tracker_ = 0;
  hysteresis_left_ = options.hysteresis;
}

void GradScaler::load(double scale, int64_t growth_tracker) {
  pending_scale_ = scale;
  pending_tracker_ = growth_tracker;
  if (scale_.defined()) {
    scale_.fill_(scale);
    growth_tracker_.fill_(growth_tracker);
  }
}

}  // namespace fabric::precision
