#include "strategies/model_parallel/tensor_parallel.h"

#include <map>
#include <mutex>
#include <stdexcept>
#include <string>

#include <ATen/Context.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/dropout.h>
#include <ATen/ops/cross_entropy_loss.h>
#include <ATen/ops/embedding.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/linear.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/grad_mode.h>

#include "strategies/model_parallel/model_parallel.h"

namespace fabric::tp {
namespace {

// Autograd keeps numbers, not objects, in a function's context: the groups the
// functions were used with are kept here under their backend's address, alive
// for the process (a job has two or three).
std::mutex& registry_mutex() {
  static std::mutex m;
  return m;
}
std::map<int64_t, Group>& registry() {
  static auto* groups = new std::map<int64_t, Group>;
  return *groups;
}
int64_t group_id(const Group& group) {
  const auto id = reinterpret_cast<int64_t>(group.backend.get());
  std::lock_guard<std::mutex> lock(registry_mutex());
  registry().emplace(id, group);
  return id;
}
Group group_of(int64_t id) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  return registry().at(id);
}

void all_reduce_sum(const Group& group, at::Tensor& t) {
  std::vector<at::Tensor> one = {t};
  group.backend->allreduce(one, c10d::AllreduceOptions())->wait();
}
void all_reduce_max(const Group& group, at::Tensor& t) {
  c10d::AllreduceOptions opts;
  opts.reduceOp = c10d::ReduceOp(c10d::ReduceOp::MAX);
  std::vector<at::Tensor> one = {t};
  group.backend->allreduce(one, opts)->wait();
}
at::Tensor gather_last_dim(const Group& group, const at::Tensor& x) {
  return at::cat(all_gather(group, x), -1);
}
at::Tensor part_of_last_dim(const Group& group, const at::Tensor& x) {
  const int64_t n = x.size(-1);
  if (n % group.size != 0) {
    throw std::invalid_argument("tensor parallel: the last dimension (" + std::to_string(n) +
                                ") does not split into " + std::to_string(group.size) + " parts");
  }
  return x.narrow(-1, group.rank * (n / group.size), n / group.size).contiguous();
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct CopyTo : torch::autograd::Function<CopyTo> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t id) {
    ctx->saved_data["g"] = id;
    return x.view_as(x);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto g = grads[0].contiguous().clone();
    all_reduce_sum(group_of(ctx->saved_data["g"].toInt()), g);
    return {g, at::Tensor()};
  }
};

struct ReduceFrom : torch::autograd::Function<ReduceFrom> {
  static at::Tensor forward(AutogradContext* /*ctx*/, const at::Tensor& x, int64_t id) {
    auto y = x.contiguous().clone();
    all_reduce_sum(group_of(id), y);
    return y;
  }
  static variable_list backward(AutogradContext* /*ctx*/, variable_list grads) {
    return {grads[0], at::Tensor()};
  }
};

struct GatherFrom : torch::autograd::Function<GatherFrom> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t id) {
    ctx->saved_data["g"] = id;
    return gather_last_dim(group_of(id), x);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {part_of_last_dim(group_of(ctx->saved_data["g"].toInt()), grads[0]), at::Tensor()};
  }
};

struct ScatterTo : torch::autograd::Function<ScatterTo> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t id) {
    ctx->saved_data["g"] = id;
    return part_of_last_dim(group_of(id), x);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {gather_last_dim(group_of(ctx->saved_data["g"].toInt()), grads[0].contiguous()),
            at::Tensor()};
  }
};

struct VocabParallelCrossEntropy : torch::autograd::Function<VocabParallelCrossEntropy> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& targets,
                            int64_t id) {
    const Group group = group_of(id);
    const int64_t part = logits.size(-1);
    auto l = logits.reshape({-1, part});
    auto t = targets.reshape({-1}).to(at::kLong);
    if (t.numel() != l.size(0)) {
      throw std::invalid_argument("vocab_parallel_cross_entropy: " + std::to_string(l.size(0)) +
                                  " rows of logits but " + std::to_string(t.numel()) + " targets");
    }
    auto max = std::get<0>(l.max(1)).contiguous();
    all_reduce_max(group, max);
    auto shifted = l - max.unsqueeze(1);
    const int64_t start = group.rank * part;
    auto outside = (t < start).logical_or(t >= start + part);
    auto local = (t - start).masked_fill(outside, 0);
    auto target_logit = shifted.gather(1, local.unsqueeze(1)).squeeze(1).masked_fill(outside, 0)
                            .contiguous();
    all_reduce_sum(group, target_logit);
    auto exp = shifted.exp();
    auto sum = exp.sum(1).contiguous();
    all_reduce_sum(group, sum);
    auto loss = (sum.log() - target_logit).mean();
    auto softmax = exp.div_(sum.unsqueeze(1));
    ctx->save_for_backward({softmax, local, outside});
    ctx->saved_data["shape"] = logits.sizes().vec();
    return loss;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto grad = saved[0].clone();
    const auto& local = saved[1];
    const auto& outside = saved[2];
    grad.scatter_add_(1, local.unsqueeze(1),
                      outside.logical_not().to(grad.scalar_type()).neg().unsqueeze(1));
    grad.mul_(grads[0] / static_cast<double>(grad.size(0)));
    return {grad.view(ctx->saved_data["shape"].toIntVector()), at::Tensor(), at::Tensor()};
  }
};

void check_divisible(int64_t n, int64_t parts, const std::string& what) {
  if (n % parts != 0) {
    throw std::invalid_argument(what + " (" + std::to_string(n) + ") is not divisible by the "
                                "tensor-parallel size " + std::to_string(parts) +
                                ": choose a tensor_parallel_size that divides it");
  }
}

}  // namespace

Group tensor_parallel_group(const strategies::Strategy& strategy) {
  if (const auto* mp = dynamic_cast<const strategies::ModelParallelStrategy*>(&strategy)) {
    return mp->tensor_parallel_group();
  }
  return Group{};
}

at::Tensor shard_of(const at::Tensor& full, Split split, int64_t rank, int64_t size) {
  if (size == 1) return full.clone();
  const int64_t n = full.size(split.dim);
  if (split.stride < 1 || n % split.stride != 0) {
    throw std::invalid_argument("tensor parallel: a dimension of size " + std::to_string(n) +
                                " does not hold " + std::to_string(split.stride) + " equal blocks");
  }
  const int64_t block = n / split.stride;
  check_divisible(block, size, split.stride > 1 ? "a split dimension's block of " + std::to_string(block) +
                                                      " (of " + std::to_string(split.stride) + ")"
                                                : "a split dimension of size " + std::to_string(n));
  const int64_t part = block / size;
  std::vector<at::Tensor> parts;
  for (int64_t b = 0; b < split.stride; ++b) {
    parts.push_back(full.narrow(split.dim, b * block + rank * part, part));
  }
  return at::cat(parts, split.dim).contiguous();
}

at::Tensor unshard(const std::vector<at::Tensor>& pieces, Split split) {
  if (pieces.size() == 1) return pieces.front().clone();
  std::vector<at::Tensor> parts;
  for (int64_t b = 0; b < split.stride; ++b) {
    for (const auto& piece : pieces) {
      const int64_t part = piece.size(split.dim) / split.stride;
      parts.push_back(piece.narrow(split.dim, b * part, part));
    }
  }
  return at::cat(parts, split.dim);
}

std::vector<at::Tensor> all_gather(const Group& group, const at::Tensor& tensor) {
  if (group.size == 1) return {tensor};
  auto input = tensor.contiguous();
  std::vector<std::vector<at::Tensor>> outputs(1);
  for (int64_t r = 0; r < group.size; ++r) outputs[0].push_back(at::empty_like(input));
  std::vector<at::Tensor> inputs = {input};
  group.backend->allgather(outputs, inputs, c10d::AllgatherOptions())->wait();
  return outputs[0];
}

at::Tensor copy_to_tensor_parallel(const at::Tensor& x, const Group& group) {
  return group.size == 1 ? x : CopyTo::apply(x, group_id(group));
}
at::Tensor reduce_from_tensor_parallel(const at::Tensor& x, const Group& group) {
  return group.size == 1 ? x : ReduceFrom::apply(x, group_id(group));
}
at::Tensor gather_from_tensor_parallel(const at::Tensor& x, const Group& group) {
  return group.size == 1 ? x : GatherFrom::apply(x, group_id(group));
}
at::Tensor scatter_to_tensor_parallel(const at::Tensor& x, const Group& group) {
  return group.size == 1 ? x : ScatterTo::apply(x, group_id(group));
}

namespace {
struct RegionGenerators {
  std::mutex mutex;
  std::map<int64_t, uint64_t> seeds;  // by group
  std::map<std::pair<int64_t, std::string>, at::Generator> generators;  // by group and device
};
RegionGenerators& region_generators() {
  static auto* g = new RegionGenerators;
  return *g;
}
}  // namespace

void manual_seed_parallel_region(const Group& group, uint64_t seed) {
  auto& g = region_generators();
  std::lock_guard<std::mutex> lock(g.mutex);
  const int64_t id = reinterpret_cast<int64_t>(group.backend.get());
  g.seeds[id] = seed;
  for (auto it = g.generators.begin(); it != g.generators.end();) {
    it = it->first.first == id ? g.generators.erase(it) : std::next(it);
  }
}

at::Generator parallel_region_generator(const Group& group, c10::Device device) {
  auto& g = region_generators();
  std::lock_guard<std::mutex> lock(g.mutex);
  const int64_t id = reinterpret_cast<int64_t>(group.backend.get());
  const auto key = std::make_pair(id, device.str());
  auto it = g.generators.find(key);
  if (it != g.generators.end()) return it->second;
  auto defaults = at::globalContext().defaultGenerator(device);
  auto seed = g.seeds.find(id);
  const uint64_t base = seed != g.seeds.end() ? seed->second : defaults.current_seed();
  at::Generator generator = defaults.clone();
  generator.set_current_seed(base + 2718 + static_cast<uint64_t>(group.rank));
  g.generators.emplace(key, generator);
  return generator;
}

at::Tensor dropout(const at::Tensor& x, double p, bool training, const Group& group) {
  if (p < 0 || p > 1) throw std::invalid_argument("tp::dropout: p must be in [0, 1], got " + std::to_string(p));
  if (group.size == 1) return at::dropout(x, p, training);
  if (!training || p == 0) return x;
  if (p == 1) return x * 0;
  auto generator = parallel_region_generator(group, x.device());
  at::Tensor mask;
  {
    torch::NoGradGuard no_grad;  // (bernoulli_ takes the generator's lock itself)
    mask = at::empty_like(x).bernoulli_(1 - p, generator);
  }
  return x * mask / (1 - p);
}

at::Tensor vocab_parallel_cross_entropy(const at::Tensor& local_logits, const at::Tensor& targets,
                                        const Group& group) {
  if (group.size == 1) {
    return at::cross_entropy_loss(local_logits.reshape({-1, local_logits.size(-1)}),
                                  targets.reshape({-1}));
  }
  return VocabParallelCrossEntropy::apply(local_logits, targets, group_id(group));
}

namespace {
at::Tensor slice_parameter(torch::nn::Module& self, const std::string& name, const at::Tensor& full,
                           Split split, const Group& group) {
  torch::NoGradGuard no_grad;
  auto piece = shard_of(full.detach(), split, group.rank, group.size);
  return self.register_parameter(name, piece, full.requires_grad());
}
}  // namespace

ColumnParallelLinearImpl::ColumnParallelLinearImpl(Group group, const torch::nn::Linear& full,
                                                   ColumnParallelLinearOptions options)
    : group_(std::move(group)), options_(options) {
  if (options_.stride < 1) throw std::invalid_argument("ColumnParallelLinear: stride must be >= 1");
  if (options_.gather_output && options_.stride != 1) {
    throw std::invalid_argument("ColumnParallelLinear: gather_output needs stride 1 (the gathered "
                                "outputs of interleaved blocks would be out of order)");
  }
  const int64_t out = full->weight.size(0);
  check_divisible(out / options_.stride, group_.size,
                  "ColumnParallelLinear: the output features" +
                      (options_.stride > 1 ? " of each of its " + std::to_string(options_.stride) + " blocks"
                                           : std::string()));
  const Split split{0, options_.stride};
  weight = slice_parameter(*this, "weight", full->weight, split, group_);
  if (full->bias.defined()) bias = slice_parameter(*this, "bias", full->bias, split, group_);
}

at::Tensor ColumnParallelLinearImpl::forward(const at::Tensor& x) {
  auto y = at::linear(copy_to_tensor_parallel(x, group_), weight, bias);
  return options_.gather_output ? gather_from_tensor_parallel(y, group_) : y;
}

std::vector<std::pair<at::Tensor, Split>> ColumnParallelLinearImpl::split_parameters() const {
  std::vector<std::pair<at::Tensor, Split>> out = {{weight, {0, options_.stride}}};
  if (bias.defined()) out.push_back({bias, {0, options_.stride}});
  return out;
}

RowParallelLinearImpl::RowParallelLinearImpl(Group group, const torch::nn::Linear& full,
                                             RowParallelLinearOptions options)
    : group_(std::move(group)), options_(options) {
  check_divisible(full->weight.size(1), group_.size, "RowParallelLinear: the input features");
  weight = slice_parameter(*this, "weight", full->weight, Split{1, 1}, group_);
  if (full->bias.defined()) {
    torch::NoGradGuard no_grad;
    bias = register_parameter("bias", full->bias.detach().clone(), full->bias.requires_grad());
  }
}

at::Tensor RowParallelLinearImpl::forward(const at::Tensor& x) {
  if (group_.size == 1) return at::linear(x, weight, bias);
  auto input = options_.input_is_parallel ? x : scatter_to_tensor_parallel(x, group_);
  auto y = reduce_from_tensor_parallel(at::linear(input, weight), group_);
  return bias.defined() ? y + bias : y;
}

std::vector<std::pair<at::Tensor, Split>> RowParallelLinearImpl::split_parameters() const {
  return {{weight, {1, 1}}};
}

VocabParallelEmbeddingImpl::VocabParallelEmbeddingImpl(Group group, const torch::nn::Embedding& full)
    : group_(std::move(group)) {
  const int64_t vocab = full->weight.size(0);
  check_divisible(vocab, group_.size, "VocabParallelEmbedding: the vocabulary size");
  vocab_start_ = group_.rank * (vocab / group_.size);
  weight = slice_parameter(*this, "weight", full->weight, Split{0, 1}, group_);
}

at::Tensor VocabParallelEmbeddingImpl::forward(const at::Tensor& ids) {
  if (group_.size == 1) return at::embedding(weight, ids);
  const int64_t part = weight.size(0);
  auto outside = (ids < vocab_start_).logical_or(ids >= vocab_start_ + part);
  auto local = (ids - vocab_start_).masked_fill(outside, 0);
  auto out = at::embedding(weight, local).masked_fill(outside.unsqueeze(-1), 0);
  return reduce_from_tensor_parallel(out, group_);
}

std::vector<std::pair<at::Tensor, Split>> VocabParallelEmbeddingImpl::split_parameters() const {
  return {{weight, {0, 1}}};
}

}  // namespace fabric::tp
