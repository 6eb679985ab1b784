// fsdp's internals, shared by the files of strategies/fsdp/ (and the unit tests
// of the flat-buffer arithmetic): the flat buffers (FlatUnit), the units that own
// them, the autograd hooks that gather and reduce them, and small storage helpers.
// Not a public header.
#pragma once

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
#include "strategies/fsdp/fsdp.h"

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

namespace fsdp_detail {


// Makes `param` (a leaf that keeps its identity) show `data`.
inline void point(at::Tensor& param, const at::Tensor& data) {
  torch::NoGradGuard no_grad;
  const bool reshaped = param.sizes() != data.sizes();
  param.set_data(data);
  // AccumulateGrad keeps the shape it was made with: drop a stale one (a graph
  // in flight keeps its own).
  if (reshaped) torch::autograd::impl::set_grad_accumulator(param, {});
}

// A tensor over `storage` that autograd does not see as a view, so optimizers may
// detach_() or reset it (zero_grad) as they do with any gradient.
inline at::Tensor alias(const at::Tensor& base, int64_t offset, c10::IntArrayRef sizes) {
  torch::NoGradGuard no_grad;
  at::Tensor out = at::empty({0}, base.options());
  out.set_(base.storage(), base.storage_offset() + offset, sizes, c10::contiguous_strides(sizes));
  return out;
}

// Frees / re-allocates a buffer's memory while keeping its storage object, so
// tensors that autograd saved (views of gathered parameters) see the data again
// after the next gather.
inline void release_storage(const at::Tensor& t) {
  auto* storage = t.storage().unsafeGetStorageImpl();
  storage->set_data_ptr_noswap(at::DataPtr(nullptr, storage->device()));
  storage->set_nbytes(0);
}
inline void allocate_storage(const at::Tensor& t, int64_t nbytes) {
  auto* storage = t.storage().unsafeGetStorageImpl();
  storage->set_data_ptr_noswap(storage->allocator()->allocate(static_cast<size_t>(nbytes)));
  storage->set_nbytes(static_cast<size_t>(nbytes));
}

// The optimizer state tensors shaped like a parameter, which sharding splits
// like the parameter itself.
inline std::vector<at::Tensor*> state_slots(const torch::optim::Optimizer& optimizer,
                                     torch::optim::OptimizerParamState& state) {
  return optim::codec_for(optimizer.defaults()).per_element_state(state);
}


}  // namespace fsdp_detail
}  // namespace fabric::strategies
