// fsdp: options checked at construction, finding the units of a set-up module and
// flattening their parameters into per-rank shards.
#include "strategies/fsdp/units.h"

namespace fabric::strategies {

using namespace fsdp_detail;

std::optional<c10::ScalarType> FSDPStrategy::default_reduce_dtype(
    const precision::Precision& precision) {
  // Lightning's FSDPPrecision: gradients reduced in the compute dtype of a
  // half-precision run, else in the parameters' own dtype.
  const auto dtype = precision.compute_dtype();
  if (dtype == at::kBFloat16 || dtype == at::kHalf) return dtype;
  return std::nullopt;
}

FSDPStrategy::FSDPStrategy(Topology topology, ProcessGroupOptions process_group,
                           FSDPOptions options)
    : ParallelStrategy("fsdp", std::move(topology), std::move(process_group)),
      options_(std::move(options)) {
  // Every mode is parsed here once; the run-time paths test enums.
  const std::vector<std::string> strategies = {"FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD"};
  const auto found = std::find(strategies.begin(), strategies.end(), options_.sharding_strategy);
  if (found == strategies.end()) {
    throw std::invalid_argument("fsdp: " + unsupported_value("sharding_strategy", options_.sharding_strategy,
                                                             strategies));
  }
  sharding_ = static_cast<Sharding>(found - strategies.begin());
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
  reduce_dtype_ = options_.reduce_dtype.empty() ? default_reduce_dtype(precision()) : dtype->second;
  const std::vector<std::string> checks = {"first_step", "always", "never"};
  const auto check = std::find(checks.begin(), checks.end(), options_.check_unit_order);
  if (check == checks.end()) {
    throw std::invalid_argument("fsdp: " + unsupported_value("check_unit_order", options_.check_unit_order,
                                                             checks));
  }
  check_order_ = static_cast<CheckOrder>(check - checks.begin());
  if (options_.state_dict_type != "full" && options_.state_dict_type != "sharded") {
    throw std::invalid_argument("fsdp: " + unsupported_value("state_dict_type", options_.state_dict_type,
                                                             {"full", "sharded"}));
  }
}

void FSDPStrategy::set_precision(std::shared_ptr<precision::Precision> plugin) {
  Strategy::set_precision(std::move(plugin));
  if (options_.reduce_dtype.empty()) reduce_dtype_ = default_reduce_dtype(precision());
  if (reducing_scaler_) reducing_scaler_->set_found_inf_reducer(nullptr);
  reducing_scaler_ = nullptr;
  // Each rank checks only its gradient pieces for inf/nan: the ranks agree
  // (max) after every check, so all skip the same steps and the scale stays equal.
  if (auto* scaler = precision().scaler(); scaler && sharded()) {
    scaler->set_found_inf_reducer([this](double found) { return all_reduce_value(found, ReduceOp::kMax); });
    reducing_scaler_ = scaler;
  }
}

FSDPStrategy::~FSDPStrategy() {
  if (reducing_scaler_) reducing_scaler_->set_found_inf_reducer(nullptr);
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

std::optional<Strategy::ParameterShard> FSDPStrategy::parameter_shard(const at::Tensor& param) const {
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
          const auto [lo, hi] = flat->piece_range(i);  // an empty piece starts at 0
          return ParameterShard{flat->shapes[i], hi > lo ? lo - flat->offsets[i] : 0};
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

}  // namespace fabric::strategies
