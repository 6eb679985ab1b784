// ZeRO stages 1 and 2 in checkpoints: inside fabric.save/load the optimizer
// shows the module's parameters and full-sized state (each rank's pieces
// all-gathered per bucket), so the file is the one DDP writes; after a load the
// full state is cut back into this rank's pieces.
#include <cstdio>
#include <functional>
#include <set>

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>

#include "optim/codec.h"
#include "strategies/deepspeed/zero.h"

namespace fabric::strategies {
namespace {

std::vector<at::Tensor*> slots_of(const torch::optim::Optimizer& optimizer,
                                  torch::optim::OptimizerParamState& state) {
  return optim::codec_for(optimizer.defaults()).per_element_state(state);
}

}  // namespace

class ZeRODataParallel::StateScope : public precision::Scope {
 public:
  StateScope(ZeRODataParallel& strategy, bool loading) : strategy_(strategy), loading_(loading) {}
  ~StateScope() override {
    try {
      leave();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "torchfabric: %s: restoring the optimizer's pieces after a checkpoint failed: %s\n",
                   strategy_.name().c_str(), e.what());
    }
  }

  void enter(const std::vector<torch::nn::Module*>& modules,
             const std::vector<torch::optim::Optimizer*>& optimizers) {
    for (auto* module : modules) {
      for (auto& state : strategy_.modules_) {
        if (state->identity.is(*module)) modules_.push_back(state.get());
      }
    }
    torch::NoGradGuard no_grad;
    for (auto* optimizer : optimizers) {
      auto found = strategy_.optimizers_.find(optimizer);
      if (found == strategy_.optimizers_.end()) continue;
      const size_t first = swaps_.size();
      for (auto& group : optimizer->param_groups()) {
        for (auto& p : group.params()) {
          const auto* owner = strategy_.owner_of(p);
          if (!owner) continue;
          auto& bucket = owner->state->buckets[owner->bucket];
          if (!bucket.pieces[owner->index].is_same(p)) continue;
          Swap swap{optimizer, &p, p, bucket.params[owner->index], *owner};
          if (loading_ && bucket.masters) {
            // The loaded state comes back in the dtype of the tensor it is loaded
            // for: an fp32 stand-in keeps fp32 moments fp32 (the module's own
            // parameter may be bf16).
            swap.shown = at::empty(swap.shown.sizes(), swap.piece.options());
          }
          move_state(*optimizer, swap.piece, swap.shown);
          p = swap.shown;
          swaps_.push_back(swap);
        }
      }
      if (loading_) continue;  // the load overwrites it; leave() cuts it into pieces
      // Per bucket and state slot: the ranks' pieces gathered into full tensors.
      for (const auto& [state, b] : found->second) {
        auto& bucket = state->buckets[b];
        std::vector<Swap*> entries;
        for (size_t s = first; s < swaps_.size(); ++s) {
          if (swaps_[s].owner.state == state && swaps_[s].owner.bucket == b) entries.push_back(&swaps_[s]);
        }
        // Every rank steps every piece (empty ones too), so the ranks agree on
        // which parameters have state and on its slots.
        auto* st0 = state_of(*optimizer, entries);
        if (!st0) continue;
        const auto slots0 = slots_of(*optimizer, *st0);
        for (size_t k = 0; k < slots0.size(); ++k) {
          if (!slots0[k]->defined()) continue;
          auto options = slots0[k]->options().device(strategy_.root_device());
          auto local = at::zeros({bucket.shard}, options);
          std::vector<at::Tensor*> targets(entries.size(), nullptr);
          for (size_t e = 0; e < entries.size(); ++e) {
            auto it = optimizer->state().find(entries[e]->shown.unsafeGetTensorImpl());
            if (it == optimizer->state().end()) continue;
            auto slots = slots_of(*optimizer, *it->second);
            if (k >= slots.size() || !slots[k]->defined()) continue;
            targets[e] = slots[k];
            const auto [lo, hi] = bucket.piece_range(entries[e]->owner.index);
            if (hi > lo) local.narrow(0, lo - bucket.begin, hi - lo).copy_(slots[k]->reshape({-1}));
          }
          auto full = local;
          if (strategy_.world_size() > 1) {
            full = at::empty({bucket.padded}, options);
            strategy_.backend()._allgather_base(full, local)->wait();
          }
          for (size_t e = 0; e < entries.size(); ++e) {
            if (!targets[e]) continue;
            const size_t i = entries[e]->owner.index;
            saved_.push_back({targets[e], *targets[e]});
            *targets[e] = full.narrow(0, bucket.offsets[i], bucket.numels[i])
                              .view(bucket.params[i].sizes())
                              .to(targets[e]->device())
                              .clone();
          }
        }
      }
    }
  }

 private:
  struct Swap {
    torch::optim::Optimizer* optimizer;
    at::Tensor* in_group;  // the optimizer's entry for it
    at::Tensor piece;      // what the optimizer steps
    at::Tensor shown;      // what it shows inside the scope
    Owner owner;
  };

  static torch::optim::OptimizerParamState* state_of(torch::optim::Optimizer& optimizer,
                                                     const std::vector<Swap*>& entries) {
    for (auto* e : entries) {
      auto it = optimizer.state().find(e->shown.unsafeGetTensorImpl());
      if (it != optimizer.state().end()) return it->second.get();
    }
    return nullptr;
  }

  void leave() {
    torch::NoGradGuard no_grad;
    for (auto& [slot, piece] : saved_) *slot = piece;
    for (auto& swap : swaps_) {
      if (loading_) {
        auto it = swap.optimizer->state().find(swap.shown.unsafeGetTensorImpl());
        if (it != swap.optimizer->state().end()) {
          const auto& bucket = swap.owner.state->buckets[swap.owner.bucket];
          const size_t i = swap.owner.index;
          const auto [lo, hi] = bucket.piece_range(i);
          for (auto* slot : slots_of(*swap.optimizer, *it->second)) {
            if (!slot->defined() || slot->numel() != bucket.numels[i]) continue;
            *slot = slot->reshape({-1})
                        .narrow(0, hi > lo ? lo - bucket.offsets[i] : 0, hi - lo)
                        .to(swap.piece.options().requires_grad(false))
                        .clone();
          }
        }
      }
      move_state(*swap.optimizer, swap.shown, swap.piece);
      *swap.in_group = swap.piece;
    }
    // Loaded parameters: the fp32 masters start again from them.
    if (loading_ && !modules_.empty()) strategy_.refresh_masters();
  }

  ZeRODataParallel& strategy_;
  bool loading_;
  std::vector<ModuleState*> modules_;
  std::vector<Swap> swaps_;
  std::vector<std::pair<at::Tensor*, at::Tensor>> saved_;
};

std::optional<Strategy::ParameterShard> ZeRODataParallel::parameter_shard(const at::Tensor& tensor) const {
  const auto* owner = owner_of(tensor);
  if (!owner) return std::nullopt;
  const auto& bucket = owner->state->buckets[owner->bucket];
  const size_t i = owner->index;
  if (!bucket.pieces[i].is_same(tensor)) return std::nullopt;  // the module's parameter: whole
  const auto [lo, hi] = bucket.piece_range(i);
  return ParameterShard{bucket.params[i].sizes().vec(), hi > lo ? lo - bucket.offsets[i] : 0};
}

at::Tensor ZeRODataParallel::parameter_of(const at::Tensor& tensor) const {
  const auto* owner = owner_of(tensor);
  if (!owner) return {};
  const auto& bucket = owner->state->buckets[owner->bucket];
  return bucket.pieces[owner->index].is_same(tensor) ? bucket.params[owner->index] : at::Tensor();
}

void ZeRODataParallel::refresh_masters() {
  torch::NoGradGuard no_grad;
  for (auto& state : modules_) {
    for (auto& bucket : state->buckets) {
      if (!bucket.masters) continue;
      for (size_t i = 0; i < bucket.params.size(); ++i) {
        const auto [lo, hi] = bucket.piece_range(i);
        if (hi > lo) bucket.pieces[i].copy_(bucket.flat.narrow(0, lo, hi - lo));
      }
    }
  }
}

precision::ScopePtr ZeRODataParallel::sharded_state_context(const std::vector<torch::nn::Module*>& /*modules*/,
                                                            const std::vector<torch::optim::Optimizer*>& /*optimizers*/,
                                                            bool loading) {
  if (!loading || !masters_) return nullptr;
  return std::make_unique<CallOnExit>([this] { refresh_masters(); });
}

precision::ScopePtr ZeRODataParallel::full_state_context(
    const std::vector<torch::nn::Module*>& modules,
    const std::vector<torch::optim::Optimizer*>& optimizers, bool loading) {
  auto scope = std::make_unique<StateScope>(*this, loading);
  scope->enter(modules, optimizers);
  return scope;
}

}  // namespace fabric::strategies
