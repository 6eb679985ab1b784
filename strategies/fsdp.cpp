#include "strategies/fsdp.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <map>
#include <stdexcept>
#include <unordered_map>
#include <unordered_set>

#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/core/StorageImpl.h>
#include <c10/util/strides.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>

#include "optim/codec.h"
#include "util/quoted_list.h"
#include "precision/grad_scaler.h"
#include "strategies/auto_wrap.h"
#include "strategies/module_identity.h"

namespace fabric::strategies {

struct FSDPStrategy::FlatUnit {
  std::vector<at::Tensor> params;  // the module's own parameter objects
  std::vector<std::string> names;
  std::vector<std::vector<int64_t>> shapes;
  std::vector<int64_t> offsets, numels;
  int64_t numel = 0, padded = 0, shard_begin = 0, shard_numel = 0;
  bool sharded = true;
  int64_t id = 0;     // the same on every rank (setup order)
  std::string owner;  // the unit's name, for errors
  bool allocated = false;           // `full` holds the gathered parameters
  at::Tensor shard;                 // this rank's slice, persistent
  at::Tensor full;                  // the gathered buffer; its storage is released when resharded
  std::vector<at::Tensor> stashed;  // gradient pieces present when gathering
  // Per parameter: a gradient was accumulated into it while gathered (set by a
  // post-accumulate-grad hook), so its .grad is this backward's full gradient,
  // not a piece left from an earlier step or micro-step.
  std::vector<char> fresh;

  // Parameter i's part of this rank's shard, in flat coordinates [lo, hi).
  std::pair<int64_t, int64_t> piece_range(size_t i) const {
    const int64_t end = shard_begin + shard_numel;
    const int64_t lo = std::clamp(offsets[i], shard_begin, end);
    const int64_t hi = std::clamp(offsets[i] + numels[i], lo, end);
    return {lo, hi};
  }
  // Parameter i at rest: its piece of the shard (NO_SHARD: its whole, shaped view).
  at::Tensor piece(size_t i) const {
    if (!sharded) return shard.narrow(0, offsets[i], numels[i]).view(shapes[i]);
    const auto [lo, hi] = piece_range(i);
    return shard.narrow(0, lo - shard_begin, hi - lo);
  }
  bool gathered() const { return !sharded || allocated; }
  int64_t full_bytes() const { return padded * static_cast<int64_t>(shard.element_size()); }
};

struct FSDPStrategy::Unit {
  std::string name;  // dotted path in the set-up module; "" for the root
  torch::nn::Module* module = nullptr;
  ModuleIdentity identity;
  bool root = false;
  std::vector<std::unique_ptr<FlatUnit>> flats;  // one per parameter dtype
  int64_t numel = 0;
  // Backward bookkeeping, reset by every fabric.backward. A unit is reduced
  // inside the backward only at a point every rank reaches in the same order:
  // when the gradients with respect to its inputs exist (the post-backward
  // identities mark_input put on them have all run), and only if every forward
  // of it this step had such inputs. Otherwise, when fabric.backward returns,
  // in unit order. Which parameters happened to get a gradient on this rank
  // plays no part (that differs between ranks when a loss term is conditional).
  // Only forwards whose graph is still alive count (one a rank ran on its own and
  // discarded, e.g. for logging, must not change what that rank does).
  bool needs_reduce = false;  // a forward for backward ran with trainable parameters
  std::vector<std::weak_ptr<PostBackward>> marks;  // this step's post-backward identities
  // Output nodes of this step's forwards that had no such input.
  std::vector<std::weak_ptr<torch::autograd::Node>> unmarked;
  bool holding = false;  // full gradients kept by a backward under no_backward_sync
  // Alive as long as the unit: hooks that outlive it (in a graph) hold it weakly.
  std::shared_ptr<char> token = std::make_shared<char>(0);
  struct Call {
    bool for_backward, gathered_now, holding;
    std::vector<std::pair<at::Tensor, int64_t>> inputs;  // marked inputs and their versions
  };
  std::vector<Call> calls;  // forwards of this unit in progress

  std::string display() const { return root ? "<root>" : name; }
  bool trainable() const {
    for (const auto& flat : flats) {
      for (const auto& p : flat->params) {
        if (p.requires_grad()) return true;
      }
    }
    return false;
  }
  void reset_backward() {
    marks.clear();
    unmarked.clear();
  }
};

struct FSDPStrategy::ModuleState {
  ModuleIdentity identity;
  std::vector<std::unique_ptr<Unit>> units;  // the root first, then blocks in module order
};

// Runs after every gradient accumulation into one of a unit's parameters.
class FSDPStrategy::GradReadyHook : public torch::autograd::PostAccumulateGradHook {
 public:
  GradReadyHook(FlatUnit& flat, size_t index) : flat_(flat), index_(index) {}
  void operator()(const torch::autograd::Variable&) override { flat_.fresh[index_] = 1; }

 private:
  FlatUnit& flat_;
  size_t index_;
};

// The identity mark_input puts on a unit's input: its backward runs once the
// gradient with respect to that input is complete, i.e. after the unit's own
// backward (it was made just before the unit's forward, so every node that
// forward made has a higher sequence number and runs first, the parameters'
// AccumulateGrad nodes too), and before any node of earlier units, whichever
// of their outputs got gradients on this rank: the same point on every rank.
// A node of our own over a detached alias of the input (not a custom Function,
// whose raw pointers could outlive the unit); the alias shares the input's
// version counter, so an in-place change of it is detected and refused.
class FSDPStrategy::PostBackward : public torch::autograd::Node {
 public:
  PostBackward(FSDPStrategy& strategy, Unit& unit)
      : strategy_(strategy), unit_(unit), token_(unit.token) {}
  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    fired = true;
    if (!token_.expired()) strategy_.post_backward(unit_);
    return std::move(grads);
  }
  std::string name() const override { return "torchfabric::FSDPPostBackward"; }
  bool fired = false;

 private:
  FSDPStrategy& strategy_;
  Unit& unit_;
  std::weak_ptr<char> token_;  // the unit (and the strategy) may be gone
};

// Runs before the backward of the node that made a unit's output.
class FSDPStrategy::PreBackwardHook : public torch::autograd::FunctionPreHook {
 public:
  explicit PreBackwardHook(std::function<void()> gather) : gather_(std::move(gather)) {}
  torch::autograd::variable_list operator()(const torch::autograd::variable_list& grads) override {
    gather_();
    return grads;
  }

 private:
  std::function<void()> gather_;
};

namespace {

// Makes `param` (a leaf that keeps its identity) show `data`.
void point(at::Tensor& param, const at::Tensor& data) {
  torch::NoGradGuard no_grad;
  const bool reshaped = param.sizes() != data.sizes();
  param.set_data(data);
  // AccumulateGrad keeps the shape it was made with: drop a stale one (a graph
  // in flight keeps its own).
  if (reshaped) torch::autograd::impl::set_grad_accumulator(param, {});
}

// A tensor over `storage` that autograd does not see as a view, so optimizers may
// detach_() or reset it (zero_grad) as they do with any gradient.
at::Tensor alias(const at::Tensor& base, int64_t offset, c10::IntArrayRef sizes) {
  torch::NoGradGuard no_grad;
  at::Tensor out = at::empty({0}, base.options());
  out.set_(base.storage(), base.storage_offset() + offset, sizes, c10::contiguous_strides(sizes));
  return out;
}

// Frees / re-allocates a buffer's memory while keeping its storage object, so
// tensors that autograd saved (views of gathered parameters) see the data again
// after the next gather.
void release_storage(const at::Tensor& t) {
  auto* storage = t.storage().unsafeGetStorageImpl();
  storage->set_data_ptr_noswap(at::DataPtr(nullptr, storage->device()));
  storage->set_nbytes(0);
}
void allocate_storage(const at::Tensor& t, int64_t nbytes) {
  auto* storage = t.storage().unsafeGetStorageImpl();
  storage->set_data_ptr_noswap(storage->allocator()->allocate(static_cast<size_t>(nbytes)));
  storage->set_nbytes(static_cast<size_t>(nbytes));
}

// The optimizer state tensors shaped like a parameter, which sharding splits
// like the parameter itself.
std::vector<at::Tensor*> state_slots(const torch::optim::Optimizer& optimizer,
                                     torch::optim::OptimizerParamState& state) {
  return optim::codec_for(optimizer.defaults()).per_element_state(state);
}

}  // namespace

FSDPStrategy::FSDPStrategy(Topology topology, ProcessGroupOptions process_group,
                           FSDPOptions options)
    : ParallelStrategy("fsdp", std::move(topology), std::move(process_group)),
      options_(std::move(options)) {
  const std::vector<std::string> strategies = {"FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD"};
  if (std::find(strategies.begin(), strategies.end(), options_.sharding_strategy) ==
      strategies.end()) {
    throw std::invalid_argument("fsdp: " + unsupported_value("sharding_strategy", options_.sharding_strategy,
                                                             strategies));
  }
  const std::map<std::string, std::optional<c10::ScalarType>> reduce_dtypes = {
      {"", std::nullopt},         {"fp32", at::kFloat},      {"float32", at::kFloat},
      {"bf16", at::kBFloat16},    {"bfloat16", at::kBFloat16}, {"fp16", at::kHalf},
      {"float16", at::kHalf}};
  auto dtype = reduce_dtypes.find(options_.reduce_dtype);
  if (dtype == reduce_dtypes.end()) {
    throw std::invalid_argument("fsdp: reduce_dtype='" + options_.reduce_dtype +
                                "' is not supported. Valid values: '' (the parameters' dtype), "
                                "'fp32', 'bf16', 'fp16'");
  }
  reduce_dtype_ = dtype->second;
  const std::vector<std::string> checks = {"first_step", "always", "never"};
  if (std::find(checks.begin(), checks.end(), options_.check_unit_order) == checks.end()) {
    throw std::invalid_argument("fsdp: " + unsupported_value("check_unit_order", options_.check_unit_order,
                                                             checks));
  }
  if (options_.state_dict_type != "full" && options_.state_dict_type != "sharded") {
    throw std::invalid_argument("fsdp: " + unsupported_value("state_dict_type", options_.state_dict_type,
                                                             {"full", "sharded"}));
  }
}

FSDPStrategy::~FSDPStrategy() {
  for (auto& state : modules_) {
    for (auto& unit : state->units) {
      if (!unit->root && !unit->identity.expired()) set_unit_runner(*unit->module, nullptr);
      for (auto& flat : unit->flats) {
        for (auto& p : flat->params) torch::autograd::impl::set_post_acc_grad_hooks(p, nullptr);
      }
    }
  }
}

FSDPStrategy::ModuleState* FSDPStrategy::find(const torch::nn::Module* module) {
  for (auto& state : modules_) {
    if (state->identity.is(*module)) return state.get();
  }
  return nullptr;
}

FSDPStrategy::Unit* FSDPStrategy::unit_of(const torch::nn::Module& module) {
  for (auto& state : modules_) {
    for (auto& unit : state->units) {
      if (unit->identity.is(module)) return unit.get();
    }
  }
  return nullptr;
}

std::vector<std::pair<std::string, int64_t>> FSDPStrategy::units() const {
  std::vector<std::pair<std::string, int64_t>> out;
  for (const auto& state : modules_) {
    for (const auto& unit : state->units) out.emplace_back(unit->name, unit->numel);
  }
  return out;
}

std::optional<std::vector<int64_t>> FSDPStrategy::full_shape(const at::Tensor& param) const {
  if (!sharded()) return std::nullopt;
  for (const auto& state : modules_) {
    for (const auto& unit : state->units) {
      for (const auto& flat : unit->flats) {
        for (size_t i = 0; i < flat->params.size(); ++i) {
          if (!flat->params[i].is_same(param)) continue;
          if (flat->gathered()) {
            throw std::runtime_error(
                "fsdp: a sharded checkpoint is written between steps (after optimizer.step()), "
                "not between a forward and its backward or during no_backward_sync "
                "accumulation: unit '" + unit->display() + "' is gathered now");
          }
          return flat->shapes[i];
        }
      }
    }
  }
  return std::nullopt;
}

void FSDPStrategy::setup_module(torch::nn::Module& module) {
  if (find(&module)) return;  // already set up (init_module + setup, or setup twice)
  // Modules that are gone (a sweep loop's earlier models): drop their state and
  // the hooks on their parameters (an optimizer may still hold them).
  for (auto& old : modules_) {
    if (!old->identity.expired()) continue;
    for (auto& unit : old->units) {
      for (auto& flat : unit->flats) {
        for (auto& p : flat->params) torch::autograd::impl::set_post_acc_grad_hooks(p, nullptr);
      }
    }
  }
  modules_.erase(std::remove_if(modules_.begin(), modules_.end(),
                                [](const auto& s) { return s->identity.expired(); }),
                 modules_.end());
  module.to(root_device());
  broadcast_module_state(module);
  for (auto& adapter : apply_auto_wrap(module, options_.auto_wrap_policy)) {
    adapters_.push_back(adapter);
  }
  auto state = std::make_unique<ModuleState>();
  state->identity = ModuleIdentity(module);

  // The root, then every marked module (or auto-wrap adapter) in module order.
  state->units.push_back(std::make_unique<Unit>());
  state->units[0]->root = true;
  state->units[0]->module = &module;
  state->units[0]->identity = ModuleIdentity(module);
  std::unordered_set<const torch::nn::Module*> seen_modules;
  for (const auto& item : module.named_modules("", /*include_self=*/false)) {
    auto* m = item.value().get();
    const bool adapter = std::any_of(adapters_.begin(), adapters_.end(),
                                     [m](const auto& a) { return a.get() == m; });
    if (!(adapter || is_marked_sharding_unit(*m)) || !seen_modules.insert(m).second) continue;
    auto unit = std::make_unique<Unit>();
    unit->name = item.key();
    unit->module = m;
    unit->identity = ModuleIdentity(*m);
    state->units.push_back(std::move(unit));
  }
  // Each parameter belongs to the innermost unit whose path contains it.
  const auto owner_of = [&](const std::string& param_name) {
    Unit* best = state->units[0].get();
    for (auto& unit : state->units) {
      const auto& n = unit->name;
      if (unit->root || param_name.size() <= n.size() || param_name.compare(0, n.size(), n) != 0 ||
          param_name[n.size()] != '.') {
        continue;
      }
      if (best->root || n.size() > best->name.size()) best = unit.get();
    }
    return best;
  };
  const int64_t world = sharded() ? topology_.world_size : 1;
  const int64_t rank = sharded() ? topology_.global_rank : 0;
  std::unordered_map<const void*, std::pair<Unit*, std::string>> seen;
  std::map<std::pair<Unit*, c10::ScalarType>, FlatUnit*> flat_of;
  for (auto& item : module.named_parameters()) {
    at::Tensor param = item.value();
    Unit* unit = owner_of(item.key());
    auto [it, fresh] = seen.emplace(param.unsafeGetTensorImpl(), std::make_pair(unit, item.key()));
    if (!fresh) {
      if (it->second.first != unit) {
        throw std::invalid_argument(
            "fsdp: parameters '" + it->second.second + "' and '" + item.key() +
            "' are the same tensor (tied weights) but belong to different sharding units ('" +
            it->second.first->display() + "' and '" + unit->display() +
            "'); tie weights only within one unit, or leave both modules out of units (in the "
            "root)");
      }
      continue;
    }
    auto& flat = flat_of[{unit, param.scalar_type()}];
    if (!flat) {
      unit->flats.push_back(std::make_unique<FlatUnit>());
      flat = unit->flats.back().get();
      flat->sharded = sharded();
      flat->owner = unit->display();
    }
    flat->params.push_back(param);
    flat->names.push_back(item.key());
    flat->shapes.push_back(param.sizes().vec());
    flat->offsets.push_back(flat->numel);
    flat->numels.push_back(param.numel());
    flat->numel += param.numel();
    unit->numel += param.numel();
  }
  // Units without parameters are plain modules.
  state->units.erase(std::remove_if(state->units.begin() + 1, state->units.end(),
                                    [](const auto& u) { return u->flats.empty(); }),
                     state->units.end());

  torch::NoGradGuard no_grad;
  for (auto& unit : state->units) {
    for (auto& flat : unit->flats) {
      flat->id = next_flat_id_++;
      flat->padded = (flat->numel + world - 1) / world * world;
      flat->shard_numel = flat->padded / world;
      flat->shard_begin = rank * flat->shard_numel;
      std::vector<at::Tensor> pieces;
      for (auto& p : flat->params) pieces.push_back(p.detach().reshape({-1}));
      if (flat->padded > flat->numel) {
        pieces.push_back(at::zeros({flat->padded - flat->numel}, flat->params.front().options()));
      }
      auto all = at::cat(pieces);
      flat->shard = all.narrow(0, flat->shard_begin, flat->shard_numel).clone();
      flat->stashed.resize(flat->params.size());
      flat->fresh.assign(flat->params.size(), 0);
      for (size_t i = 0; i < flat->params.size(); ++i) {
        auto& p = flat->params[i];
        p.mutable_grad() = at::Tensor();
        point(p, flat->piece(i));
        // On every parameter, trainable or not now (requires_grad may change).
        torch::autograd::impl::set_post_acc_grad_hooks(p, std::make_unique<GradReadyHook>(*flat, i));
      }
    }
    if (!unit->root) set_unit_runner(*unit->module, this);
  }
  modules_.push_back(std::move(state));
}

void FSDPStrategy::unshard(FlatUnit& unit) {
  if (unit.gathered()) return;
  const bool check = options_.check_unit_order == "always" ||
                     (options_.check_unit_order == "first_step" && !stepped_);
  if (check && topology_.world_size > 1) {
    const double id = static_cast<double>(unit.id);
    auto ids = at::tensor(std::vector<double>{id, -id},
                          at::TensorOptions().dtype(at::kDouble)).to(root_device());
    all_reduce(ids, ReduceOp::kMax);
    ids = ids.cpu();
    const double highest = ids[0].item<double>(), lowest = -ids[1].item<double>();
    if (highest != id || lowest != id) {
      throw std::runtime_error(
          "fsdp: the ranks are gathering different sharding units: this rank unit '" +
          unit.owner + "' (#" + std::to_string(unit.id) + "), the others units #" +
          std::to_string(static_cast<int64_t>(lowest)) + " to #" +
          std::to_string(static_cast<int64_t>(highest)) +
          "; every rank must run the same units in the same order (same model, same "
          "branches, same number of forward calls)");
    }
  }
  if (!unit.full.defined()) {
    unit.full = at::empty({unit.padded}, unit.shard.options());
  } else {
    allocate_storage(unit.full, unit.full_bytes());
  }
  backend()._allgather_base(unit.full, unit.shard)->wait();
  unit.allocated = true;
  gathered_bytes_ += unit.full_bytes();
  peak_gathered_bytes_ = std::max(peak_gathered_bytes_, gathered_bytes_);
  for (size_t i = 0; i < unit.params.size(); ++i) {
    auto& p = unit.params[i];
    if (p.grad().defined()) {  // a gradient piece not yet zeroed: added back later
      unit.stashed[i] = p.grad();
      p.mutable_grad() = at::Tensor();
    }
    point(p, unit.full.narrow(0, unit.offsets[i], unit.numels[i]).view(unit.shapes[i]));
  }
}

void FSDPStrategy::reshard(FlatUnit& unit, bool copy_back) {
  if (!unit.sharded || !unit.allocated) return;
  torch::NoGradGuard no_grad;
  if (copy_back) unit.shard.copy_(unit.full.narrow(0, unit.shard_begin, unit.shard_numel));
  for (size_t i = 0; i < unit.params.size(); ++i) {
    point(unit.params[i], unit.piece(i));
    // Gradient pieces set aside while gathered (a forward without backward, a
    // checkpoint) go back where they were.
    if (unit.stashed[i].defined()) {
      unit.params[i].mutable_grad() = unit.stashed[i];
      unit.stashed[i] = at::Tensor();
    }
  }
  gathered_bytes_ -= unit.full_bytes();
  release_storage(unit.full);
  unit.allocated = false;
}

void FSDPStrategy::reshard_unit(Unit& unit) {
  for (auto& flat : unit.flats) reshard(*flat, /*copy_back=*/false);
}

void FSDPStrategy::reduce_gradients(FlatUnit& unit) {
  torch::NoGradGuard no_grad;
  // Gradients travel in the reduce dtype (Lightning's mapping: bf16 under bf16
  // precision), floating-point units only.
  auto reduce_options = unit.shard.options();
  if (reduce_dtype_ && at::isFloatingType(unit.shard.scalar_type())) {
    reduce_options = reduce_options.dtype(*reduce_dtype_);
  }
  auto flat = at::zeros({unit.padded}, reduce_options);
  // Gradient pieces from before this backward (not zeroed) are added afterwards:
  // set aside by the gather, or still on the parameter when this backward gave
  // it nothing (a micro-step whose loss did not reach it).
  std::vector<at::Tensor> earlier(unit.params.size());
  std::swap(earlier, unit.stashed);
  unit.stashed.resize(unit.params.size());
  for (size_t i = 0; i < unit.params.size(); ++i) {
    auto& p = unit.params[i];
    const at::Tensor grad = p.grad();
    const bool fresh = unit.fresh[i] != 0;
    unit.fresh[i] = 0;
    if (!grad.defined()) continue;
    if (!fresh) {
      if (!earlier[i].defined()) earlier[i] = grad;
      p.mutable_grad() = at::Tensor();
      continue;
    }
    if (grad.numel() != unit.numels[i]) {
      throw std::runtime_error("fsdp: the gradient of '" + unit.names[i] + "' has " +
                               std::to_string(grad.numel()) + " elements, the parameter " +
                               std::to_string(unit.numels[i]) +
                               "; do not replace a parameter's gradient inside a backward");
    }
    flat.narrow(0, unit.offsets[i], unit.numels[i]).copy_(grad.reshape({-1}));
  }
  // Every unit that ran a forward for backward is reduced on every rank (zeros
  // where no gradient came), so the collectives stay in step.
  flat.div_(static_cast<double>(topology_.world_size));
  at::Tensor grad_shard;
  if (unit.sharded) {
    grad_shard = at::empty({unit.shard_numel}, flat.options());
    c10d::ReduceScatterOptions opts;
    opts.reduceOp = c10d::ReduceOp(c10d::ReduceOp::SUM);
    backend()._reduce_scatter_base(grad_shard, flat, opts)->wait();
    reshard(unit, /*copy_back=*/false);
  } else {
    std::vector<at::Tensor> one = {flat};
    backend().allreduce(one, c10d::AllreduceOptions())->wait();
    grad_shard = flat;
  }
  if (grad_shard.scalar_type() != unit.shard.scalar_type()) {
    grad_shard = grad_shard.to(unit.shard.scalar_type());
  }
  for (size_t i = 0; i < unit.params.size(); ++i) {
    auto& p = unit.params[i];
    if (!p.requires_grad()) continue;
    at::Tensor g;
    if (unit.sharded) {
      const auto [lo, hi] = unit.piece_range(i);
      g = alias(grad_shard, lo - unit.shard_begin, {hi - lo});
    } else {
      g = alias(grad_shard, unit.offsets[i], unit.shapes[i]);
    }
    if (earlier[i].defined()) {
      if (earlier[i].numel() != g.numel()) {
        throw std::runtime_error("fsdp: the gradient of '" + unit.names[i] + "' kept from before "
                                 "this backward has " + std::to_string(earlier[i].numel()) +
                                 " elements, this rank's piece " + std::to_string(g.numel()) +
                                 "; assign parameters' gradients only through backward");
      }
      g.add_(earlier[i]);
    }
    p.mutable_grad() = g;
  }
}

void FSDPStrategy::reduce_unit(Unit& unit) {
  for (auto& flat : unit.flats) reduce_gradients(*flat);
  unit.needs_reduce = false;
  unit.holding = false;
}

void FSDPStrategy::begin_forward(Unit& unit, bool for_backward) {
  bool gathered_now = false;
  for (auto& flat : unit.flats) {
    if (flat->gathered()) continue;
    unshard(*flat);
    gathered_now = true;
  }
  unit.calls.push_back({for_backward, gathered_now, unit.holding, {}});
}

void FSDPStrategy::end_forward_for_backward(Unit& unit, size_t marked_inputs,
                                            const std::vector<at::Tensor>& outputs) {
  if (unit.trainable()) unit.needs_reduce = true;
  if (marked_inputs > 0) return;
  for (const auto& out : outputs) {
    if (out.defined() && out.grad_fn()) unit.unmarked.push_back(out.grad_fn());
  }
}

at::Tensor FSDPStrategy::mark_input(torch::nn::Module& module, const at::Tensor& input) {
  Unit* unit = unit_of(module);
  if (!unit || unit->calls.empty() || !input.defined() || !input.requires_grad() ||
      !torch::autograd::GradMode::is_enabled()) {
    return input;
  }
  auto node = std::make_shared<PostBackward>(*this, *unit);
  node->add_next_edge(torch::autograd::impl::gradient_edge(input));
  at::Tensor out = input.detach();  // same storage and version counter
  const auto input_nr = node->add_input_metadata(out);
  torch::autograd::impl::set_gradient_edge(out, {node, input_nr});
  unit->marks.push_back(node);
  unit->calls.back().inputs.emplace_back(input, static_cast<int64_t>(input._version()));
  return out;
}

void FSDPStrategy::post_backward(Unit& unit) {
  // Only inside fabric.backward: autograd::grad (a gradient penalty) or a second
  // pass over a retained graph runs these hooks too.
  if (!in_backward_ || !unit.calls.empty()) return;
  for (const auto& mark : unit.marks) {
    if (auto node = mark.lock(); node && !node->fired) return;
  }
  for (const auto& node : unit.unmarked) {
    if (!node.expired()) return;  // reduced when fabric.backward returns
  }
  if (unit.needs_reduce) {
    if (sync_) reduce_unit(unit);  // no_backward_sync: keep full parameters and gradients
  } else if (!unit.holding && !unit.trainable()) {
    reshard_unit(unit);  // frozen: nothing to reduce, the backward is done with it
  }
}

void FSDPStrategy::pre_forward(torch::nn::Module& module) {
  Unit* unit = unit_of(module);
  if (!unit) return;
  begin_forward(*unit, torch::autograd::GradMode::is_enabled());
}

void FSDPStrategy::post_forward(torch::nn::Module& module, const std::vector<at::Tensor>& outputs) {
  Unit* unit = unit_of(module);
  if (!unit || unit->calls.empty()) return;
  const auto call = unit->calls.back();
  for (const auto& [input, version] : call.inputs) {
    if (static_cast<int64_t>(input._version()) != version) {
      // (run_sharding_unit calls forward_failed, which pops the call.)
      throw std::runtime_error(
          "fsdp: unit '" + unit->display() + "' modified a tensor argument of its forward in "
          "place (x += ..., x.mul_(...)); under fsdp a unit's inputs are tracked for its "
          "backward and must not change: compute out of place (x = x + f(x))");
    }
  }
  unit->calls.pop_back();
  if (call.for_backward) end_forward_for_backward(*unit, call.inputs.size(), outputs);
  bool hooked = false;
  if (call.for_backward) {
    // Pre-backward: gather the parameters again before the unit's backward runs,
    // for every output that requires grad, trainable unit or frozen (the backward
    // through a frozen unit needs its weights too).
    for (const auto& out : outputs) {
      if (!out.defined() || !out.requires_grad()) continue;
      // A pre-hook of the output's node, not a tensor hook: the engine runs a
      // node's tensor hooks first, so the next unit's post-backward hook on this
      // same tensor (its input) reduces and frees that unit before this one is
      // gathered (root + one unit at a time).
      const std::weak_ptr<char> token = unit->token;
      auto gather = [this, unit, token]() {
        if (token.expired()) return;  // the unit (a module set up no more) is gone
        for (auto& flat : unit->flats) unshard(*flat);
      };
      if (const auto node = out.grad_fn()) {
        node->add_pre_hook(std::make_unique<PreBackwardHook>(std::move(gather)));
      } else {
        out.register_hook([gather](const at::Tensor&) { gather(); });
      }
      hooked = true;
    }
  }
  if (!hooked && (!call.for_backward || !unit->needs_reduce)) {  // no backward through this call
    if (call.gathered_now) reshard_unit(*unit);
    return;
  }
  const bool free_now = hooked && call.gathered_now && !call.holding && sync_ &&
                        options_.sharding_strategy == "FULL_SHARD" &&
                        options_.reshard_after_forward;
  if (free_now) reshard_unit(*unit);
}

void FSDPStrategy::forward_failed(torch::nn::Module& module) {
  Unit* unit = unit_of(module);
  if (!unit || unit->calls.empty()) return;
  const auto call = unit->calls.back();
  unit->calls.pop_back();
  if (call.gathered_now && !unit->needs_reduce) reshard_unit(*unit);
}

// The set-up module's forward: the root unit.
class FSDPStrategy::RootScope : public precision::Scope {
 public:
  RootScope(FSDPStrategy& strategy, Unit& root) : strategy_(strategy), root_(root) {}
  ~RootScope() override {
    if (root_.calls.empty()) return;
    const auto call = root_.calls.back();
    root_.calls.pop_back();
    if (call.for_backward) strategy_.end_forward_for_backward(root_, call.inputs.size(), {});
    // For a backward the root stays gathered until fabric.backward ends (its
    // outputs are not seen here, so a frozen root stays too: the backward through
    // it needs its weights).
    if (!call.for_backward && call.gathered_now) strategy_.reshard_unit(root_);
  }

 private:
  FSDPStrategy& strategy_;
  Unit& root_;
};

precision::ScopePtr FSDPStrategy::forward_context(torch::nn::Module& module) {
  auto* state = find(&module);
  if (!state) return nullptr;
  Unit& root = *state->units.front();
  begin_forward(root, torch::autograd::GradMode::is_enabled());
  return std::make_unique<RootScope>(*this, root);
}

void FSDPStrategy::setup_optimizer(torch::optim::Optimizer& optimizer) {
  Strategy::setup_optimizer(optimizer);
  if (!optimizer.state().empty()) {
    throw std::invalid_argument(
        "fsdp: the optimizer already has state (it has taken a step); its state would be "
        "full-sized on every rank. Create the optimizer fresh and call fabric.setup(model, "
        "optimizer) before the first step (load a checkpoint after setup to resume)");
  }
}

at::Tensor FSDPStrategy::optimizer_step(torch::optim::Optimizer& optimizer,
                                        precision::Precision& precision,
                                        const precision::LossClosure& closure) {
  if (auto* scaler = precision.scaler(); scaler && scaler->is_enabled() && sharded()) {
    // Each rank checked only its gradient pieces for inf/nan: agree (max) before
    // the step, so every rank skips the same steps and the scale stays equal.
    scaler->prepare_step(optimizer);  // (an AmpScalingStep optimizer: checked only)
    auto& found = scaler->found_inf(optimizer);
    double any = 0;
    for (const auto& f : found) any = std::max(any, f.item<double>());
    const double agreed = all_reduce_value(any, ReduceOp::kMax);
    for (auto& f : found) f.fill_(agreed);
  }
  stepped_ = true;
  return precision.optimizer_step(optimizer, closure);
}

void FSDPStrategy::backward(const at::Tensor& loss, precision::Precision& precision) {
  in_backward_ = true;
  try {
    precision.pre_backward(loss).backward();
  } catch (...) {
    in_backward_ = false;
    throw;
  }
  in_backward_ = false;
  for (auto& state : modules_) {
    for (auto& unit : state->units) {
      unit->reset_backward();
      if (!sync_) {  // no_backward_sync: keep full parameters and gradients
        unit->holding = unit->holding || unit->needs_reduce;
        if (!unit->holding && unit->calls.empty()) reshard_unit(*unit);
        continue;
      }
      // Units not reduced inside the backward, in unit order on every rank.
      if (unit->needs_reduce) {
        reduce_unit(*unit);
      } else if (unit->calls.empty()) {
        reshard_unit(*unit);
      }
    }
  }
}

double FSDPStrategy::clip_gradients_norm(torch::nn::Module* module,
                                         torch::optim::Optimizer& optimizer,
                                         precision::Precision& precision, double max_norm,
                                         double norm_type, bool error_if_nonfinite) {
  if (!sharded()) {
    return Strategy::clip_gradients_norm(module, optimizer, precision, max_norm, norm_type,
                                         error_if_nonfinite);
  }
  precision.unscale_gradients(optimizer);
  std::vector<at::Tensor> grads;
  for (const auto& p : optimizer_parameters(optimizer)) {
    if (p.grad().defined()) grads.push_back(p.grad());
  }
  const bool inf_norm = std::isinf(norm_type);
  double local = 0;
  for (const auto& g : grads) {
    if (g.numel() == 0) continue;
    auto a = g.detach().to(at::kDouble).abs();
    local = inf_norm ? std::max(local, a.max().item<double>())
                     : local + a.pow(norm_type).sum().item<double>();
  }
  double total = all_reduce_value(local, inf_norm ? ReduceOp::kMax : ReduceOp::kSum);
  if (!inf_norm) total = std::pow(total, 1.0 / norm_type);
  if (error_if_nonfinite && !std::isfinite(total)) {
    throw std::runtime_error("fsdp: the total norm of order " + std::to_string(norm_type) +
                             " of the gradients is non-finite, so it cannot be clipped; "
                             "pass error_if_nonfinite=false to clip anyway");
  }
  const double coef = max_norm / (total + 1e-6);
  if (coef < 1.0) {
    torch::NoGradGuard no_grad;
    for (auto& g : grads) g.mul_(coef);
  }
  return total;
}

class FSDPStrategy::StateScope : public precision::Scope {
 public:
  StateScope(FSDPStrategy& strategy, bool loading) : strategy_(strategy), loading_(loading) {}
  ~StateScope() override {
    try {
      leave();
    } catch (const std::exception& e) {
      // A scope's exit cannot throw; a failure here leaves ranks out of step.
      std::fprintf(stderr, "torchfabric: fsdp: re-sharding after a checkpoint failed: %s\n",
                   e.what());
    }
  }
  void enter(const std::vector<torch::nn::Module*>& modules,
             const std::vector<torch::optim::Optimizer*>& optimizers) {
    optimizers_ = optimizers;
    auto& owner = owner_;
    for (auto& state : strategy_.modules_) {
      for (auto& block : state->units) {
        for (auto& unit : block->flats) {
          for (size_t i = 0; i < unit->params.size(); ++i) {
            owner[unit->params[i].unsafeGetTensorImpl()] = {unit.get(), i};
          }
        }
      }
    }
    for (auto* module : modules) {
      auto* state = strategy_.find(module);
      if (!state) continue;
      for (auto& block : state->units) {
        for (auto& unit : block->flats) {
          units_.push_back(unit.get());
          if (!unit->gathered()) {
            strategy_.unshard(*unit);
            gathered_.push_back(unit.get());
          }
        }
      }
    }
    // Loading an optimizer checks its state's shapes against the parameters:
    // gather the units that own them too (only for their shapes: leave() frees
    // them without touching the parameters' values).
    if (loading_) {
      for (auto* optimizer : optimizers) {
        for (const auto& p : optimizer_parameters(*optimizer)) {
          auto it = owner.find(p.unsafeGetTensorImpl());
          if (it == owner.end()) continue;
          auto* unit = it->second.first;
          if (unit->gathered() ||
              std::find(units_.begin(), units_.end(), unit) != units_.end()) {
            continue;
          }
          strategy_.unshard(*unit);
          shape_only_.push_back(unit);
        }
      }
    }
    // Optimizer state: per unit and per slot, gather the pieces into full tensors.
    for (auto* optimizer : optimizers) {
      struct Entry {
        size_t index;
        std::vector<at::Tensor*> slots;
      };
      std::map<FlatUnit*, std::vector<Entry>> per_unit;
      std::vector<FlatUnit*> order;
      for (const auto& p : optimizer_parameters(*optimizer)) {
        auto it = owner.find(p.unsafeGetTensorImpl());
        if (it == owner.end()) continue;
        auto* unit = it->second.first;
        if (!unit->sharded) continue;  // NO_SHARD: state is whole already
        auto st = optimizer->state().find(p.unsafeGetTensorImpl());
        if (per_unit.find(unit) == per_unit.end()) order.push_back(unit);
        auto& entries = per_unit[unit];
        if (st == optimizer->state().end()) continue;
        entries.push_back({it->second.second, state_slots(*optimizer, *st->second)});
      }
      if (loading_) continue;  // loading overwrites it; leave() shards what was loaded
      for (auto* unit : order) {
        auto& entries = per_unit[unit];
        if (entries.empty()) continue;
        for (size_t k = 0; k < entries.front().slots.size(); ++k) {
          if (!entries.front().slots[k]->defined()) continue;
          const auto options = entries.front().slots[k]->options();
          auto local = at::zeros({unit->shard_numel}, options);
          for (auto& e : entries) {
            const auto [lo, hi] = unit->piece_range(e.index);
            if (hi > lo) local.narrow(0, lo - unit->shard_begin, hi - lo).copy_(e.slots[k]->reshape({-1}));
          }
          auto full = at::empty({unit->padded}, options);
          strategy_.backend()._allgather_base(full, local)->wait();
          for (auto& e : entries) {
            saved_.push_back({e.slots[k], *e.slots[k]});
            *e.slots[k] = full.narrow(0, unit->offsets[e.index], unit->numels[e.index])
                              .view(unit->shapes[e.index])
                              .clone();
          }
        }
      }
    }
  }

 private:
  void leave() {
    if (!loading_) {
      for (auto& [slot, piece] : saved_) *slot = piece;
      for (auto* unit : gathered_) strategy_.reshard(*unit, /*copy_back=*/false);
      return;
    }
    for (auto* unit : shape_only_) strategy_.reshard(*unit, /*copy_back=*/false);
    // After a load: the full values become this rank's pieces again.
    for (auto* unit : units_) {
      if (std::find(gathered_.begin(), gathered_.end(), unit) != gathered_.end()) {
        strategy_.reshard(*unit, /*copy_back=*/true);  // also puts stashed gradients back
      } else if (unit->sharded && unit->allocated) {
        unit->shard.copy_(unit->full.narrow(0, unit->shard_begin, unit->shard_numel));
      }
    }
    // Loaded optimizer state is full-sized: keep this rank's pieces. (State the
    // load did not touch is already piece-sized and is left alone.)
    for (auto* optimizer : optimizers_) {
      for (const auto& p : optimizer_parameters(*optimizer)) {
        auto it = owner_.find(p.unsafeGetTensorImpl());
        auto st = optimizer->state().find(p.unsafeGetTensorImpl());
        if (it == owner_.end() || st == optimizer->state().end()) continue;
        auto* unit = it->second.first;
        const size_t index = it->second.second;
        if (!unit->sharded) continue;
        for (auto* slot : state_slots(*optimizer, *st->second)) {
          if (!slot->defined() || slot->numel() != unit->numels[index]) continue;
          const auto [lo, hi] = unit->piece_range(index);
          const int64_t start = hi > lo ? lo - unit->offsets[index] : 0;
          *slot = slot->reshape({-1}).narrow(0, start, hi - lo).clone();
        }
      }
    }
  }
  FSDPStrategy& strategy_;
  bool loading_;
  std::vector<FlatUnit*> units_, gathered_, shape_only_;
  std::vector<std::pair<at::Tensor*, at::Tensor>> saved_;
  std::vector<torch::optim::Optimizer*> optimizers_;
  std::unordered_map<const void*, std::pair<FlatUnit*, size_t>> owner_;
};

precision::ScopePtr FSDPStrategy::full_state_context(
    const std::vector<torch::nn::Module*>& modules,
    const std::vector<torch::optim::Optimizer*>& optimizers, bool loading) {
  auto scope = std::make_unique<StateScope>(*this, loading);
  scope->enter(modules, optimizers);
  return scope;
}

}  // namespace fabric::strategies
