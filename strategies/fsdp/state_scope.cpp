// fsdp's full state for checkpoints: gathering parameters and optimizer state
// on entry, and after a load sharding the restored values back on exit.
#include "strategies/fsdp/units.h"

namespace fabric::strategies {

using namespace fsdp_detail;

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
