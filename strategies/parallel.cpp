#include "strategies/parallel.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>

#include "strategies/nccl_backend.h"

namespace fabric::strategies {

ParallelStrategy::ParallelStrategy(std::string name, Topology topology,
                                   ProcessGroupOptions process_group)
    : name_(std::move(name)),
      topology_(std::move(topology)),
      pg_options_(std::move(process_group)) {
  if (topology_.parallel_devices.empty()) {
    throw std::invalid_argument("strategy='" + name_ + "' needs at least one device");
  }
  if (topology_.local_rank < 0 ||
      topology_.local_rank >= static_cast<int64_t>(topology_.parallel_devices.size())) {
    throw std::invalid_argument(
        "local rank " + std::to_string(topology_.local_rank) + " has no device: this node has " +
        std::to_string(topology_.parallel_devices.size()) + " device(s) (devices=" +
        std::to_string(topology_.parallel_devices.size()) + ")");
  }
  pg_options_.rank = topology_.global_rank;
  pg_options_.world_size = topology_.world_size;
  pg_options_.device = root_device();
  if (pg_options_.backend.empty()) pg_options_.backend = default_backend(root_device().type());
  check_backend(pg_options_.backend, root_device().type());
}

ParallelStrategy::~ParallelStrategy() {
  if (!pg_.group) return;
  try {
    pg_.group->shutdown();
  } catch (...) {
    // Nothing useful to do in a destructor; the process is ending the group anyway.
  }
}

c10::Device ParallelStrategy::root_device() const {
  return topology_.parallel_devices[static_cast<size_t>(topology_.local_rank)];
}

c10d::Backend& ParallelStrategy::backend() const {
  if (!pg_.group) {
    throw std::logic_error("the " + name_ +
                           " process group does not exist yet: call fabric.launch() before "
                           "setup and collectives");
  }
  return *pg_.group->getBackend(root_device().type());
}

void ParallelStrategy::adopt_process_group(ProcessGroupHandle group) {
  if (!group.group) throw std::invalid_argument(name_ + ": adopt_process_group got no group");
  if (group.group->getRank() != topology_.global_rank ||
      group.group->getSize() != topology_.world_size) {
    throw std::invalid_argument(name_ + ": the adopted group has this rank as " +
                                std::to_string(group.group->getRank()) + " of " +
                                std::to_string(group.group->getSize()) + ", but its topology says " +
                                std::to_string(topology_.global_rank) + " of " +
                                std::to_string(topology_.world_size));
  }
  pg_ = std::move(group);
}

void ParallelStrategy::setup_environment() {
  if (pg_.group) return;
  if (root_device().is_cuda()) set_cuda_device(root_device().index());
  pg_ = create_process_group(pg_options_);
}

void ParallelStrategy::broadcast_module_state(torch::nn::Module& module) {
  broadcast_module_state(module, backend());
}

void ParallelStrategy::broadcast_module_state(torch::nn::Module& module, c10d::Backend& be,
                                              const std::function<bool(const at::Tensor&)>& include) {
  torch::NoGradGuard no_grad;
  c10d::BroadcastOptions root;
  root.rootRank = 0;
  std::vector<at::Tensor> tensors;
  for (auto& p : module.parameters()) {
    if (!include || include(p)) tensors.push_back(p.detach());
  }
  for (auto& b : module.buffers()) tensors.push_back(b);
  for (auto& t : tensors) {
    std::vector<at::Tensor> one = {t};
    be.broadcast(one, root)->wait();
  }
}

void ParallelStrategy::all_reduce(at::Tensor& tensor, ReduceOp op) {
  c10d::AllreduceOptions opts;
  switch (op) {
    case ReduceOp::kSum:
    case ReduceOp::kMean: opts.reduceOp = c10d::ReduceOp(c10d::ReduceOp::SUM); break;
    case ReduceOp::kMax: opts.reduceOp = c10d::ReduceOp(c10d::ReduceOp::MAX); break;
    case ReduceOp::kMin: opts.reduceOp = c10d::ReduceOp(c10d::ReduceOp::MIN); break;
  }
  if (op == ReduceOp::kMean && !tensor.is_floating_point()) {
    throw std::invalid_argument(std::string("all_reduce 'mean' needs a floating-point tensor, got ") +
                                c10::toString(tensor.scalar_type()));
  }
  std::vector<at::Tensor> one = {tensor};
  backend().allreduce(one, opts)->wait();
  if (op == ReduceOp::kMean) tensor.div_(static_cast<double>(topology_.world_size));
}

void ParallelStrategy::broadcast(at::Tensor& tensor, int64_t src) {
  if (src < 0 || src >= topology_.world_size) {
    throw std::invalid_argument("broadcast: src=" + std::to_string(src) +
                                " is not a rank of this world (0.." +
                                std::to_string(topology_.world_size - 1) + ")");
  }
  c10d::BroadcastOptions opts;
  opts.rootRank = src;
  std::vector<at::Tensor> one = {tensor};
  backend().broadcast(one, opts)->wait();
}

at::Tensor ParallelStrategy::all_gather(const at::Tensor& tensor) {
  auto input = tensor.contiguous();
  std::vector<std::vector<at::Tensor>> outputs(1);
  for (int64_t r = 0; r < topology_.world_size; ++r) outputs[0].push_back(at::empty_like(input));
  std::vector<at::Tensor> inputs = {input};
  backend().allgather(outputs, inputs, c10d::AllgatherOptions())->wait();
  return at::stack(outputs[0]);
}

void ParallelStrategy::barrier() {
  auto token = at::zeros({1}, at::TensorOptions().device(root_device()));
  std::vector<at::Tensor> one = {token};
  backend().allreduce(one, c10d::AllreduceOptions())->wait();
  // Reading the result on the host blocks until the collective has really run
  // (for NCCL, wait() above only made the current CUDA stream wait).
  (void)token.item<float>();
}

}  // namespace fabric::strategies

namespace fabric::strategies {

double ParallelStrategy::clip_pieces_norm(torch::optim::Optimizer& optimizer, double max_norm,
                                          double norm_type, bool error_if_nonfinite,
                                          const std::function<double(const at::Tensor&)>& share) {
  precision_->unscale_gradients(optimizer);
  std::vector<at::Tensor> grads, params;
  for (const auto& p : optimizer_parameters(optimizer)) {
    if (p.grad().defined() && p.grad().numel() > 0) {
      grads.push_back(p.grad());
      params.push_back(p);
    }
  }
  const bool inf_norm = std::isinf(norm_type);
  double local = 0;
  for (size_t i = 0; i < grads.size(); ++i) {
    auto a = grads[i].detach().to(at::kDouble).abs();
    local = inf_norm ? std::max(local, a.max().item<double>())
                     : local + a.pow(norm_type).sum().item<double>() * (share ? share(params[i]) : 1.0);
  }
  double total = all_reduce_value(local, inf_norm ? ReduceOp::kMax : ReduceOp::kSum);
  if (!inf_norm) total = std::pow(total, 1.0 / norm_type);
  if (error_if_nonfinite && !std::isfinite(total)) {
    throw std::runtime_error(name_ + ": the total norm of order " + std::to_string(norm_type) +
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

}  // namespace fabric::strategies
