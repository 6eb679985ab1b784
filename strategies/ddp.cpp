#include "strategies/ddp.h"

#include <algorithm>
#include <mutex>
#include <stdexcept>

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/tensor.h>
#include <c10/util/strides.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/csrc/autograd/utils/lambda_post_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/nn/module.h>

#include "precision/precision.h"
#include "strategies/module_identity.h"
#include "strategies/mpi_backend.h"
#include "strategies/nccl_backend.h"

namespace fabric::strategies {

struct DDPStrategy::ModuleState {
  struct Bucket {
    at::Tensor flat;
    std::vector<at::Tensor> params;
    std::vector<std::string> names;
    std::vector<int64_t> offsets;
    std::vector<char> ready;
    size_t pending = 0;  // parameters whose gradient has not arrived yet
    c10::intrusive_ptr<c10d::Work> work;
  };
  ModuleIdentity identity;
  std::vector<Bucket> buckets;
  std::vector<std::shared_ptr<torch::autograd::Node>> accumulators;
  std::vector<at::Tensor> buffers;
  size_t next_launch = 0;  // buckets [0, next_launch) are being reduced
  bool touched = false;
  std::mutex mutex;
};

DDPStrategy::DDPStrategy(Topology topology, ProcessGroupOptions process_group, DDPOptions options)
    : ParallelStrategy("ddp", std::move(topology), std::move(process_group)), options_(options) {
  if (options_.bucket_cap_mb <= 0 || options_.first_bucket_cap_mb <= 0) {
    throw std::invalid_argument("DDP bucket sizes must be > 0 MB");
  }
}

DDPStrategy::~DDPStrategy() = default;

void DDPStrategy::setup_module(torch::nn::Module& module) {
  for (const auto& state : modules_) {
    if (state->identity.is(module)) return;  // already set up: hooks exist, state is synced
  }
  // Modules that are gone (a sweep loop's earlier models): drop their buckets.
  // Their hooks go with the gradient accumulators only this state kept alive.
  modules_.erase(std::remove_if(modules_.begin(), modules_.end(),
                                [](const auto& s) { return s->identity.expired(); }),
                 modules_.end());
  module.to(root_device());
  auto state = std::make_unique<ModuleState>();
  state->identity = ModuleIdentity(module);
  // Every rank starts from rank 0's weights and buffers.
  broadcast_module_state(module);
  for (auto& b : module.buffers()) state->buffers.push_back(b);

  // Buckets over the trainable parameters in reverse order, split by dtype.
  std::vector<std::pair<std::string, at::Tensor>> params;
  for (auto& item : module.named_parameters()) {
    if (item.value().requires_grad()) params.emplace_back(item.key(), item.value());
  }
  std::reverse(params.begin(), params.end());
  const double mib = 1024.0 * 1024.0;
  size_t bytes = 0;
  ModuleState::Bucket* current = nullptr;
  for (auto& [name, param] : params) {
    const double cap = (state->buckets.size() <= 1 ? options_.first_bucket_cap_mb
                                                   : options_.bucket_cap_mb) * mib;
    const bool new_bucket = !current || current->params.front().scalar_type() !=
                                            param.scalar_type() ||
                            (bytes > 0 && bytes + param.nbytes() > cap &&
                             !current->params.empty());
    if (new_bucket) {
      state->buckets.emplace_back();
      current = &state->buckets.back();
      bytes = 0;
    }
    current->offsets.push_back(current->params.empty()
                                   ? 0
                                   : current->offsets.back() + current->params.back().numel());
    current->params.push_back(param);
    current->names.push_back(name);
    bytes += param.nbytes();
  }
  for (auto& bucket : state->buckets) {
    const int64_t numel = bucket.offsets.back() + bucket.params.back().numel();
    bucket.flat = at::zeros({numel}, bucket.params.front().options().requires_grad(false));
    bucket.ready.assign(bucket.params.size(), 0);
    bucket.pending = bucket.params.size();
  }

  // A post-accumulation hook per parameter feeds its bucket.
  ModuleState* raw = state.get();
  for (size_t b = 0; b < raw->buckets.size(); ++b) {
    for (size_t i = 0; i < raw->buckets[b].params.size(); ++i) {
      auto accumulator = torch::autograd::impl::grad_accumulator(raw->buckets[b].params[i]);
      accumulator->add_post_hook(std::make_unique<torch::autograd::utils::LambdaPostHook>(
          [this, raw, b, i](const torch::autograd::variable_list& outputs,
                            const torch::autograd::variable_list& /*inputs*/) {
            if (!sync_) return outputs;
            std::lock_guard<std::mutex> lock(raw->mutex);
            auto& bucket = raw->buckets[b];
            if (bucket.ready[i]) return outputs;  // (a launched bucket is all ready)
            const auto& grad = bucket.params[i].grad();
            auto slice = bucket.flat.narrow(0, bucket.offsets[i], bucket.params[i].numel());
            if (grad.defined()) {
              // The average's division on the way in, as PyTorch's reducer does:
              // one pass over the gradient instead of a copy and a division.
              at::mul_out(slice, grad.reshape({-1}), 1.0 / static_cast<double>(topology_.world_size));
            } else {
              slice.zero_();
            }
            bucket.ready[i] = 1;
            raw->touched = true;
            if (--bucket.pending == 0) launch_full_buckets(*raw);
            return outputs;
          }));
      raw->accumulators.push_back(std::move(accumulator));
    }
  }
  modules_.push_back(std::move(state));
}

void DDPStrategy::launch_full_buckets(ModuleState& state) {
  // Every consecutive full bucket, in index order, so all ranks issue the same
  // collectives in the same order.
  while (state.next_launch < state.buckets.size() &&
         state.buckets[state.next_launch].pending == 0) {
    auto& next = state.buckets[state.next_launch++];
    std::vector<at::Tensor> one = {next.flat};
    next.work = backend().allreduce(one, c10d::AllreduceOptions());
  }
}

precision::ScopePtr DDPStrategy::forward_context(torch::nn::Module& module) {
  if (!options_.broadcast_buffers || topology_.world_size == 1 || !sync_ ||
      !module.is_training() || !torch::autograd::GradMode::is_enabled()) {
    return nullptr;
  }
  for (auto& state : modules_) {
    if (!state->identity.is(module) || state->buffers.empty()) continue;
    torch::NoGradGuard no_grad;
    c10d::BroadcastOptions root;
    root.rootRank = 0;
    for (auto& buffer : state->buffers) {
      std::vector<at::Tensor> one = {buffer};
      backend().broadcast(one, root)->wait();
    }
  }
  return nullptr;
}

void DDPStrategy::backward(const at::Tensor& loss) {
  if (!sync_) {
    precision_->pre_backward(loss).backward();
    return;
  }
  for (auto& state : modules_) {
    std::lock_guard<std::mutex> lock(state->mutex);
    for (auto& bucket : state->buckets) {
      std::fill(bucket.ready.begin(), bucket.ready.end(), 0);
      bucket.pending = bucket.params.size();
      bucket.work.reset();
    }
    state->next_launch = 0;
    state->touched = false;
  }
  precision_->pre_backward(loss).backward();
  const auto backward_end = std::chrono::steady_clock::now();
  for (auto& state : modules_) {
    if (state->touched) finish_sync(*state, backward_end);
  }
}

void DDPStrategy::finish_sync(ModuleState& state,
                              std::chrono::steady_clock::time_point backward_end) {
  std::vector<std::string> unused;
  // Under find_unused_parameters: which parameters got a gradient on this rank
  // (1) or not (0), one entry per parameter in bucket order; summed over the
  // ranks, a 0 means no rank used it.
  std::vector<int32_t> used;
  std::vector<int64_t> first_of_bucket;
  {
    std::lock_guard<std::mutex> lock(state.mutex);
    if (options_.find_unused_parameters) {
      int64_t count = 0;
      for (const auto& bucket : state.buckets) {
        first_of_bucket.push_back(count);
        count += static_cast<int64_t>(bucket.params.size());
      }
      used.assign(static_cast<size_t>(count), 1);
    }
    for (size_t b = state.next_launch; b < state.buckets.size(); ++b) {
      auto& bucket = state.buckets[b];
      for (size_t i = 0; i < bucket.params.size(); ++i) {
        if (bucket.ready[i]) continue;
        bucket.flat.narrow(0, bucket.offsets[i], bucket.params[i].numel()).zero_();
        bucket.ready[i] = 1;
        unused.push_back(bucket.names[i]);
        if (!used.empty()) used[static_cast<size_t>(first_of_bucket[b]) + i] = 0;
      }
      bucket.pending = 0;
    }
    launch_full_buckets(state);
  }
  std::vector<char> globally_unused;
  if (!used.empty()) {
    // After the buckets, so every rank issues the same collectives in the same order.
    std::vector<at::Tensor> one = {at::tensor(used, at::kInt).to(root_device())};
    backend().allreduce(one, c10d::AllreduceOptions())->wait();
    auto host = one[0].cpu();
    const int32_t* counts = host.data_ptr<int32_t>();
    for (int64_t i = 0; i < host.numel(); ++i) globally_unused.push_back(counts[i] == 0);
  }
  for (size_t b = 0; b < state.buckets.size(); ++b) {
    auto& bucket = state.buckets[b];
    bucket.work->wait();
    if (auto timing = collective_timing(bucket.work)) {
      const double total = std::chrono::duration<double>(timing->end - timing->start).count();
      const auto hidden_end = std::min(timing->end, backward_end);
      const double hidden =
          hidden_end > timing->start
              ? std::chrono::duration<double>(hidden_end - timing->start).count()
              : 0.0;
      stats_.comm_seconds += total;
      stats_.hidden_seconds += hidden;
    }
    ++stats_.buckets_reduced;
    for (size_t i = 0; i < bucket.params.size(); ++i) {
      auto& param = bucket.params[i];
      // No rank used it: its gradient stays as it was (undefined after
      // zero_grad), so optimizers skip it, as with PyTorch's DDP.
      if (!globally_unused.empty() && globally_unused[first_of_bucket[b] + i]) continue;
      auto slice = bucket.flat.narrow(0, bucket.offsets[i], param.numel()).view(param.sizes());
      if (options_.gradient_as_bucket_view) {
        // An alias of the bucket's memory that autograd does not track as a view,
        // so optimizers may detach_() or reset it (zero_grad) as usual.
        torch::NoGradGuard no_grad;
        at::Tensor alias = at::empty({0}, bucket.flat.options());
        alias.set_(bucket.flat.storage(), bucket.flat.storage_offset() + bucket.offsets[i],
                   param.sizes(), c10::contiguous_strides(param.sizes()));
        param.mutable_grad() = alias;
      } else if (param.grad().defined()) {
        param.mutable_grad().copy_(slice);
      } else {
        param.mutable_grad() = slice.clone();
      }
    }
  }
  if (!unused.empty() && !options_.find_unused_parameters) {
    std::string names;
    for (const auto& n : unused) names += (names.empty() ? "" : ", ") + n;
    throw std::runtime_error(
        "ddp: these parameters received no gradient in this backward: " + names +
        ". If the model does not use every parameter in every step, pass "
        "find_unused_parameters=true (a parameter some rank used then gets the average with "
        "zeros from the others; one no rank used keeps its gradient as it was)");
  }
}

std::vector<size_t> DDPStrategy::bucket_counts() const {
  std::vector<size_t> out;
  for (const auto& state : modules_) out.push_back(state->buckets.size());
  return out;
}

}  // namespace fabric::strategies
