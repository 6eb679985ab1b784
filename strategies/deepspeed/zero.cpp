// ZeRO stages 1 and 2: buckets and pieces at set-up, the bucketed reduction
// during backward, the step on the pieces and the all-gather after it.
#include "strategies/deepspeed/zero.h"

#include <cmath>
#include <limits>
#include <set>
#include <stdexcept>

#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/strides.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/csrc/autograd/utils/lambda_post_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>

#include "precision/grad_scaler.h"

namespace fabric::strategies {
namespace {

// A tensor over `base`'s storage that autograd does not see as a view, so
// optimizers may detach_() or reset it as any gradient or parameter.
at::Tensor alias(const at::Tensor& base, int64_t offset, c10::IntArrayRef sizes) {
  torch::NoGradGuard no_grad;
  at::Tensor out = at::empty({0}, base.options());
  out.set_(base.storage(), base.storage_offset() + offset, sizes, c10::contiguous_strides(sizes));
  return out;
}

// A bucket's gradient buffer for this backward: every parameter's slice is
// written (its gradient, or zeros) before the bucket is reduced; the padding is zero.
void allocate_grad(ZeRODataParallel::Bucket& bucket) {
  bucket.grad = at::empty({bucket.padded}, bucket.flat.options());
  const int64_t used = bucket.offsets.back() + bucket.numels.back();
  if (used < bucket.padded) bucket.grad.narrow(0, used, bucket.padded - used).zero_();
}

}  // namespace

void apply_deepspeed_precision(const std::string& strategy, const DeepSpeedOptions& options,
                               const ZeRODataParallel::FromConfig& config,
                               precision::Precision& plugin) {
  const auto dtype = plugin.compute_dtype();
  const auto check = [&](const std::optional<bool>& enabled, const char* key, at::ScalarType want,
                         const char* choices) {
    if (!enabled) return;
    if (*enabled && dtype != want) {
      throw std::invalid_argument(strategy + ": the deepspeed config has " + key +
                                  ".enabled = true, but the precision is '" + plugin.name() +
                                  "'; pass precision=" + choices + ", or remove the " + key + " section");
    }
    if (!*enabled && dtype == want) {
      throw std::invalid_argument(strategy + ": the deepspeed config has " + key +
                                  ".enabled = false, but the precision is '" + plugin.name() +
                                  "'; make them agree");
    }
  };
  check(config.fp16, "fp16", at::kHalf, "'16-mixed' or '16-true'");
  check(config.bf16, "bf16", at::kBFloat16, "'bf16-mixed' or 'bf16-true'");
  if (auto* scaler = plugin.scaler()) {
    auto o = scaler->options();
    if (options.loss_scale > 0) {  // a static scale
      o.init_scale = options.loss_scale;
      o.growth_factor = 1;
      o.backoff_factor = 1;
    } else {
      o.init_scale = std::ldexp(1.0, options.initial_scale_power);
      o.growth_interval = options.loss_scale_window;
      o.hysteresis = options.hysteresis;
      o.min_scale = options.min_loss_scale;
    }
    scaler->set_options(o);
  }
}

ZeRODataParallel::ZeRODataParallel(std::string name, Topology topology, ProcessGroupOptions process_group,
                                   DeepSpeedOptions options, FromConfig from_config)
    : ParallelStrategy(std::move(name), std::move(topology), std::move(process_group)),
      options_(std::move(options)),
      from_config_(from_config) {
  if (options_.stage != 1 && options_.stage != 2) {
    throw std::invalid_argument(name_ + ": ZeRODataParallel runs stages 1 and 2, not " +
                                std::to_string(options_.stage) + " (stage 3 is DeepSpeedStage3)");
  }
  if (options_.reduce_bucket_size < 1 || options_.allgather_bucket_size < 1) {
    throw std::invalid_argument(name_ + ": reduce_bucket_size and allgather_bucket_size must be >= 1 "
                                "element");
  }
  if (options_.offload_parameters) {
    throw std::invalid_argument(name_ + ": offload_parameters (offload_param) needs stage 3: "
                                "parameters are whole on every rank in stages 1 and 2; use "
                                "offload_optimizer, or strategy='deepspeed_stage_3_offload'");
  }
}

ZeRODataParallel::~ZeRODataParallel() {
  if (reducing_scaler_) reducing_scaler_->set_found_inf_reducer(nullptr);
}

void ZeRODataParallel::setup_environment() {
  ParallelStrategy::setup_environment();
  warn_about_config(from_config_, global_rank());
}

void ZeRODataParallel::set_precision(std::shared_ptr<precision::Precision> plugin) {
  Strategy::set_precision(std::move(plugin));
  apply_deepspeed_precision(name_, options_, from_config_, precision());
  if (reducing_scaler_) reducing_scaler_->set_found_inf_reducer(nullptr);
  reducing_scaler_ = nullptr;
  // Each rank checks only its pieces for inf/nan: the ranks agree (max), so
  // every rank skips the same steps and the scales stay equal.
  if (auto* scaler = precision().scaler()) {
    scaler->set_found_inf_reducer([this](double found) { return all_reduce_value(found, ReduceOp::kMax); });
    reducing_scaler_ = scaler;
  }
}

void ZeRODataParallel::setup_module(torch::nn::Module& module) {
  for (const auto& state : modules_) {
    if (state->identity.is(module)) return;
  }
  modules_.erase(std::remove_if(modules_.begin(), modules_.end(),
                                [](const auto& s) { return s->identity.expired(); }),
                 modules_.end());
  module.to(root_device());
  auto state = std::make_unique<ModuleState>();
  state->identity = ModuleIdentity(module);
  broadcast_module_state(module);

  std::vector<std::pair<std::string, at::Tensor>> params;
  std::set<const void*> seen;  // a tied weight is one parameter under two names
  for (auto& item : module.named_parameters()) {
    if (item.value().requires_grad() && seen.insert(item.value().unsafeGetTensorImpl()).second) {
      params.emplace_back(item.key(), item.value());
    }
  }
  std::reverse(params.begin(), params.end());
  const int64_t world = topology_.world_size, rank = topology_.global_rank;
  Bucket* current = nullptr;
  int64_t count = 0;
  for (auto& [name, param] : params) {
    if (!current || current->params.front().scalar_type() != param.scalar_type() ||
        (count > 0 && count + param.numel() > options_.reduce_bucket_size)) {
      state->buckets.emplace_back();
      current = &state->buckets.back();
      count = 0;
    }
    current->offsets.push_back(count);
    current->numels.push_back(param.numel());
    current->params.push_back(param);
    current->names.push_back(name);
    count += param.numel();
  }
  const bool offload = options_.offload_optimizer;
  const c10::Device master_device = offload ? c10::Device(c10::kCPU) : root_device();
  const bool pin = offload && root_device().is_cuda();
  torch::NoGradGuard no_grad;
  for (auto& bucket : state->buckets) {
    const int64_t numel = bucket.offsets.back() + bucket.numels.back();
    bucket.padded = (numel + world - 1) / world * world;
    bucket.shard = bucket.padded / world;
    bucket.begin = rank * bucket.shard;
    bucket.masters = offload || bucket.params.front().scalar_type() != at::kFloat;
    masters_ = masters_ || bucket.masters;
    bucket.flat = at::zeros({bucket.padded}, bucket.params.front().options().requires_grad(false));
    for (size_t i = 0; i < bucket.params.size(); ++i) {
      auto& param = bucket.params[i];
      bucket.flat.narrow(0, bucket.offsets[i], bucket.numels[i]).view(param.sizes()).copy_(param);
      // The parameter keeps its identity (module members, user pointers) and
      // shows its part of the flat buffer.
      param.set_data(alias(bucket.flat, bucket.offsets[i], param.sizes()));
      const auto [lo, hi] = bucket.piece_range(i);
      at::Tensor piece;
      if (bucket.masters) {
        auto options = at::TensorOptions().dtype(at::kFloat).device(master_device).pinned_memory(pin);
        piece = at::empty({hi - lo}, options);
        piece.copy_(bucket.flat.narrow(0, lo, hi - lo));
      } else {
        piece = alias(bucket.flat, lo, {hi - lo});
      }
      piece.requires_grad_(true);
      bucket.pieces.push_back(piece);
    }
    bucket.ready.assign(bucket.params.size(), 0);
    bucket.pending = bucket.params.size();
  }

  ModuleState* raw = state.get();
  for (size_t b = 0; b < raw->buckets.size(); ++b) {
    for (size_t i = 0; i < raw->buckets[b].params.size(); ++i) {
      owners_[raw->buckets[b].params[i].unsafeGetTensorImpl()] = {raw, b, i};
      owners_[raw->buckets[b].pieces[i].unsafeGetTensorImpl()] = {raw, b, i};
      auto accumulator = torch::autograd::impl::grad_accumulator(raw->buckets[b].params[i]);
      accumulator->add_post_hook(std::make_unique<torch::autograd::utils::LambdaPostHook>(
          [this, raw, b, i](const torch::autograd::variable_list& outputs,
                            const torch::autograd::variable_list& /*inputs*/) {
            if (!sync_ || !in_backward_) return outputs;
            std::lock_guard<std::mutex> lock(raw->mutex);
            auto& bucket = raw->buckets[b];
            if (bucket.ready[i]) return outputs;
            auto& param = bucket.params[i];
            if (!bucket.grad.defined()) allocate_grad(bucket);
            const auto& grad = param.grad();
            auto slice = bucket.grad.narrow(0, bucket.offsets[i], bucket.numels[i]);
            if (grad.defined()) {
              // The average's division on the way in (one pass over the gradient).
              at::mul_out(slice, grad.reshape({-1}), 1.0 / static_cast<double>(topology_.world_size));
              param.mutable_grad() = at::Tensor();  // the bucket holds it now
            } else {
              slice.zero_();
            }
            bucket.ready[i] = 1;
            raw->touched = true;
            if (--bucket.pending == 0 && options_.overlap_comm) launch_ready(*raw);
            return outputs;
          }));
      raw->accumulators.push_back(std::move(accumulator));
    }
  }
  modules_.push_back(std::move(state));
  // Owners of modules that are gone were dropped with them: rebuild the index.
  owners_.clear();
  for (auto& s : modules_) {
    for (size_t b = 0; b < s->buckets.size(); ++b) {
      for (size_t i = 0; i < s->buckets[b].params.size(); ++i) {
        owners_[s->buckets[b].params[i].unsafeGetTensorImpl()] = {s.get(), b, i};
        owners_[s->buckets[b].pieces[i].unsafeGetTensorImpl()] = {s.get(), b, i};
      }
    }
  }
}

const ZeRODataParallel::Owner* ZeRODataParallel::owner_of(const at::Tensor& param) const {
  auto it = owners_.find(param.unsafeGetTensorImpl());
  return it == owners_.end() ? nullptr : &it->second;
}

void ZeRODataParallel::setup_optimizer(torch::optim::Optimizer& optimizer) {
  if (optimizers_.count(&optimizer)) return;  // set up already: its groups hold pieces
  Strategy::setup_optimizer(optimizer);
  if (!optimizer.state().empty()) {
    throw std::invalid_argument(
        name_ + ": the optimizer already has state (it has taken a step); its state would be "
        "full-sized on every rank. Create the optimizer fresh and call fabric.setup(model, "
        "optimizer) before the first step (load a checkpoint after setup to resume)");
  }
  std::set<std::pair<size_t, size_t>> used;  // (module index, bucket)
  for (auto& group : optimizer.param_groups()) {
    for (auto& p : group.params()) {
      const auto* owner = owner_of(p);
      if (!owner) {
        if (!p.requires_grad()) continue;  // frozen: nothing to step
        throw std::invalid_argument(
            name_ + ": the optimizer has a trainable parameter of shape " + c10::str(p.sizes()) +
            " that belongs to no module set up by this strategy; set up the module that owns it "
            "(fabric.setup(model, optimizer) does both)");
      }
      auto& bucket = owner->state->buckets[owner->bucket];
      p = bucket.pieces[owner->index];
      size_t m = 0;
      while (modules_[m].get() != owner->state) ++m;
      used.insert({m, owner->bucket});
    }
  }
  auto& list = optimizers_[&optimizer];
  for (const auto& [m, b] : used) list.emplace_back(modules_[m].get(), b);
}

void ZeRODataParallel::launch_ready(ModuleState& state) {
  while (state.next_launch < state.buckets.size() && state.buckets[state.next_launch].pending == 0) {
    auto& bucket = state.buckets[state.next_launch++];
    if (!bucket.grad.defined()) allocate_grad(bucket);
    if (options_.stage == 1) {
      std::vector<at::Tensor> one = {bucket.grad};
      bucket.work = backend().allreduce(one, c10d::AllreduceOptions());
    } else {
      bucket.reduced = at::empty({bucket.shard}, bucket.flat.options());
      c10d::ReduceScatterOptions opts;
      opts.reduceOp = c10d::ReduceOp::SUM;
      bucket.work = backend()._reduce_scatter_base(bucket.reduced, bucket.grad, opts);
    }
  }
}

void ZeRODataParallel::backward(const at::Tensor& loss) {
  for (auto& state : modules_) {
    std::lock_guard<std::mutex> lock(state->mutex);
    // Stage 1: the full gradients of the last sync are in the pieces already
    // (a gradient the program replaced since is its own and stays).
    size_t k = 0;
    for (auto& bucket : state->buckets) {
      for (auto& param : bucket.params) {
        if (k < state->synced_grads.size() && param.grad().defined() &&
            param.grad().is_same(state->synced_grads[k])) {
          param.mutable_grad() = at::Tensor();
        }
        ++k;
      }
    }
    state->synced_grads.clear();
    for (auto& bucket : state->buckets) {
      std::fill(bucket.ready.begin(), bucket.ready.end(), 0);
      bucket.pending = bucket.params.size();
      bucket.work.reset();
      bucket.grad = at::Tensor();
      bucket.reduced = at::Tensor();
    }
    state->next_launch = 0;
    state->touched = false;
  }
  if (!sync_) {  // no_backward_sync: full gradients accumulate in param.grad
    precision_->pre_backward(loss).backward();
    return;
  }
  in_backward_ = true;
  try {
    precision_->pre_backward(loss).backward();
  } catch (...) {
    in_backward_ = false;
    throw;
  }
  in_backward_ = false;
  // Every module is reduced on every rank unless no rank's backward reached it
  // (a second model with a backward of its own): the ranks agree on that first.
  std::vector<char> reached;
  for (auto& state : modules_) reached.push_back(state->touched || modules_.size() == 1);
  if (modules_.size() > 1) {
    std::vector<double> flags(reached.begin(), reached.end());
    auto t = at::tensor(flags, at::kDouble).to(root_device());
    all_reduce(t, ReduceOp::kMax);
    auto host = t.cpu();
    for (size_t m = 0; m < reached.size(); ++m) reached[m] = host.data_ptr<double>()[m] != 0;
  }
  for (size_t m = 0; m < modules_.size(); ++m) {
    if (reached[m]) finish_sync(*modules_[m]);
  }
}

void ZeRODataParallel::finish_sync(ModuleState& state) {
  std::lock_guard<std::mutex> lock(state.mutex);
  // Gradients that did not arrive count as zeros (their part of the bucket).
  for (size_t b = state.next_launch; b < state.buckets.size(); ++b) {
    auto& bucket = state.buckets[b];
    if (!bucket.grad.defined()) allocate_grad(bucket);
    for (size_t i = 0; i < bucket.params.size(); ++i) {
      if (!bucket.ready[i]) bucket.grad.narrow(0, bucket.offsets[i], bucket.numels[i]).zero_();
    }
    std::fill(bucket.ready.begin(), bucket.ready.end(), 1);
    bucket.pending = 0;
  }
  launch_ready(state);
  torch::NoGradGuard no_grad;
  for (auto& bucket : state.buckets) {
    bucket.work->wait();
    bucket.work.reset();
    const at::Tensor& source = options_.stage == 1 ? bucket.grad : bucket.reduced;
    const int64_t base = options_.stage == 1 ? 0 : bucket.begin;
    for (size_t i = 0; i < bucket.params.size(); ++i) {
      const auto [lo, hi] = bucket.piece_range(i);
      auto& piece = bucket.pieces[i];
      // Every piece gets a gradient, empty ones too, so every rank's optimizer
      // steps every parameter the same number of times (equal state layouts).
      if (!piece.grad().defined()) {
        piece.mutable_grad() = bucket.masters
                                   ? source.narrow(0, lo - base, hi - lo).to(piece.options(), false, true)
                                   : alias(source, lo - base, {hi - lo});
      } else {
        piece.mutable_grad().add_(source.narrow(0, lo - base, hi - lo).to(piece.device()));
      }
    }
    if (options_.stage == 1) {
      // The averaged full gradients stay readable (DDP's semantics) until the next backward.
      for (size_t i = 0; i < bucket.params.size(); ++i) {
        auto& param = bucket.params[i];
        param.mutable_grad() = alias(bucket.grad, bucket.offsets[i], param.sizes());
        state.synced_grads.push_back(param.grad());
      }
    } else {
      bucket.grad = at::Tensor();  // gradient memory: this rank's slice only
    }
  }
}

at::Tensor ZeRODataParallel::optimizer_step(torch::optim::Optimizer& optimizer,
                                            const precision::LossClosure& closure) {
  auto it = optimizers_.find(&optimizer);
  if (it != optimizers_.end() && !closure) {
    // Gradients the pieces never got (a backward outside fabric.backward, or only
    // no_backward_sync ones) would make this step silently do nothing.
    bool pieces = false, stray = false;
    for (const auto& [state, b] : it->second) {
      for (const auto& piece : state->buckets[b].pieces) pieces = pieces || piece.grad().defined();
      for (const auto& param : state->buckets[b].params) stray = stray || param.grad().defined();
    }
    if (!pieces && stray) {
      throw std::runtime_error(
          name_ + ": the parameters have gradients this rank's optimizer pieces never received: "
          "run the backward through fabric.backward(loss), and step after a synced backward (the "
          "last micro-batch outside no_backward_sync)");
    }
  }
  if (options_.gradient_clipping > 0) {
    clip_gradients_norm(nullptr, optimizer, options_.gradient_clipping, 2.0, false);
  }
  auto out = precision_->optimizer_step(optimizer, closure);
  if (it == optimizers_.end()) return out;
  torch::NoGradGuard no_grad;
  std::vector<std::pair<c10::intrusive_ptr<c10d::Work>, at::Tensor>> in_flight;
  int64_t elements = 0;
  for (auto& [state, b] : it->second) {
    auto& bucket = state->buckets[b];
    if (bucket.masters) {  // the updated fp32 masters, in the parameters' dtype
      for (size_t i = 0; i < bucket.params.size(); ++i) {
        const auto [lo, hi] = bucket.piece_range(i);
        if (hi > lo) bucket.flat.narrow(0, lo, hi - lo).copy_(bucket.pieces[i]);
      }
    }
    if (topology_.world_size == 1) continue;
    auto local = bucket.flat.narrow(0, bucket.begin, bucket.shard).clone();
    in_flight.emplace_back(backend()._allgather_base(bucket.flat, local), local);
    elements += bucket.padded;
    if (elements >= options_.allgather_bucket_size) {
      for (auto& [work, keep] : in_flight) work->wait();
      in_flight.clear();
      elements = 0;
    }
  }
  for (auto& [work, keep] : in_flight) work->wait();
  return out;
}

double ZeRODataParallel::clip_gradients_norm(torch::nn::Module* /*module*/,
                                             torch::optim::Optimizer& optimizer, double max_norm,
                                             double norm_type, bool error_if_nonfinite) {
  return clip_pieces_norm(optimizer, max_norm, norm_type, error_if_nonfinite);
}

int64_t ZeRODataParallel::gradient_bytes() const {
  std::set<const void*> seen;
  int64_t bytes = 0;
  const auto count = [&](const at::Tensor& t) {
    if (!t.defined() || t.numel() == 0) return;
    const void* storage = t.storage().unsafeGetStorageImpl();
    if (seen.insert(storage).second) bytes += static_cast<int64_t>(t.storage().nbytes());
  };
  for (const auto& state : modules_) {
    for (const auto& bucket : state->buckets) {
      count(bucket.grad);
      count(bucket.reduced);
      for (const auto& p : bucket.params) count(p.grad());
      for (const auto& p : bucket.pieces) count(p.grad());
    }
  }
  return bytes;
}

std::vector<size_t> ZeRODataParallel::bucket_counts() const {
  std::vector<size_t> out;
  for (const auto& state : modules_) out.push_back(state->buckets.size());
  return out;
}

}  // namespace fabric::strategies
