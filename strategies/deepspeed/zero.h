// The data of ZeRODataParallel (stages 1 and 2), shared by zero.cpp (set-up,
// backward, step) and zero_state.cpp (checkpoints), and a scope helper the
// deepspeed sources share. Not a public header.
#pragma once

#include <algorithm>
#include <cstdio>
#include <functional>
#include <mutex>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/distributed/c10d/Work.hpp>
#include <torch/optim/optimizer.h>

#include "strategies/deepspeed/deepspeed.h"
#include "strategies/module_identity.h"

namespace fabric::strategies {

struct ZeRODataParallel::Bucket {
  std::vector<at::Tensor> params;  // the module's parameters, views of `flat`
  std::vector<std::string> names;
  std::vector<int64_t> offsets, numels;
  int64_t padded = 0;  // flat's elements: a multiple of the world size
  int64_t shard = 0;   // padded / world size
  int64_t begin = 0;   // this rank's slice: [begin, begin + shard)
  bool masters = false;  // pieces are fp32 master copies, not aliases of `flat`
  at::Tensor flat;       // the parameters
  at::Tensor grad;       // this backward's full gradients (padded); stage 1 keeps them
  at::Tensor reduced;    // stage 2: this rank's slice of the reduced gradients
  std::vector<at::Tensor> pieces;  // what the optimizer steps, per parameter (maybe empty)
  std::vector<char> ready;
  size_t pending = 0;
  c10::intrusive_ptr<c10d::Work> work;

  // Parameter i's elements in this rank's slice, as [lo, hi) positions in flat.
  std::pair<int64_t, int64_t> piece_range(size_t i) const {
    const int64_t lo = std::max(offsets[i], begin);
    const int64_t hi = std::min(offsets[i] + numels[i], begin + shard);
    return hi > lo ? std::make_pair(lo, hi) : std::make_pair(begin, begin);  // empty: at `begin`
  }
};

struct ZeRODataParallel::ModuleState {
  ModuleIdentity identity;
  std::vector<Bucket> buckets;
  std::vector<std::shared_ptr<torch::autograd::Node>> accumulators;
  // Stage 1: the full gradients the last sync left in param.grad, in bucket and
  // parameter order (cleared by the next backward: the pieces already hold them).
  std::vector<at::Tensor> synced_grads;
  size_t next_launch = 0;  // buckets [0, next_launch) are being reduced
  bool touched = false;
  std::mutex mutex;
};

// Moves the optimizer state kept under `from` to `to` (nothing when there is
// none): the checkpoint scopes show the module's parameters in the optimizer.
inline void move_state(torch::optim::Optimizer& optimizer, const at::Tensor& from, const at::Tensor& to) {
  auto& states = optimizer.state();
  auto it = states.find(from.unsafeGetTensorImpl());
  if (it == states.end()) return;
  auto state = std::move(it->second);
  states.erase(it);
  states[to.unsafeGetTensorImpl()] = std::move(state);
}

// A scope that runs `done` when it ends (after a sharded load: the fp32
// masters taken again from the loaded parameters). A failure is reported, not
// thrown (a scope's exit cannot throw).
class CallOnExit : public precision::Scope {
 public:
  explicit CallOnExit(std::function<void()> done) : done_(std::move(done)) {}
  ~CallOnExit() override {
    try {
      done_();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "torchfabric: deepspeed: after a sharded load: %s\n", e.what());
    }
  }

 private:
  std::function<void()> done_;
};

}  // namespace fabric::strategies
