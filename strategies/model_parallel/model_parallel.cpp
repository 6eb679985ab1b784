#include "strategies/model_parallel/model_parallel.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <stdexcept>

#include <ATen/ops/empty.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>

#include "optim/codec.h"
#include "precision/grad_scaler.h"
#include "strategies/ddp.h"
#include "strategies/fsdp/fsdp.h"

namespace fabric::strategies {

MeshShape resolve_mesh_shape(const ModelParallelOptions& options, int64_t world_size,
                             int64_t devices_per_node) {
  if (options.tensor_parallel_size < 0 || options.data_parallel_size < 0) {
    throw std::invalid_argument(
        "model_parallel: tensor_parallel_size and data_parallel_size must be positive, or 0 "
        "(\"auto\"); got tensor_parallel_size=" + std::to_string(options.tensor_parallel_size) +
        ", data_parallel_size=" + std::to_string(options.data_parallel_size));
  }
  MeshShape mesh;
  int64_t tp = options.tensor_parallel_size, dp = options.data_parallel_size;
  if (tp == 0 && dp == 0) {
    tp = devices_per_node;
  } else if (tp == 0) {
    tp = dp > 0 && world_size % dp == 0 ? world_size / dp : devices_per_node;
  }
  if (dp == 0) dp = tp > 0 && world_size % tp == 0 ? world_size / tp : 0;
  if (tp * dp != world_size) {
    throw std::invalid_argument(
        "model_parallel: data_parallel_size x tensor_parallel_size must be the world size " +
        std::to_string(world_size) + " (devices x num_nodes), got " +
        (options.data_parallel_size ? std::to_string(dp) : "auto") + " x " +
        (options.tensor_parallel_size ? std::to_string(tp) : "auto (" + std::to_string(tp) + ")") +
        "; choose sizes whose product is " + std::to_string(world_size));
  }
  mesh.data_parallel = dp;
  mesh.tensor_parallel = tp;
  return mesh;
}

namespace {
Topology data_parallel_topology(const Topology& world, const MeshShape& mesh) {
  Topology t = world;
  t.global_rank = world.global_rank / mesh.tensor_parallel;
  t.world_size = mesh.data_parallel;
  return t;
}
}  // namespace

ModelParallelStrategy::ModelParallelStrategy(Topology topology, ProcessGroupOptions process_group,
                                             ModelParallelOptions options, DDPOptions ddp,
                                             FSDPOptions fsdp)
    : ParallelStrategy("model_parallel", topology, process_group), options_(std::move(options)) {
  mesh_ = resolve_mesh_shape(options_, topology_.world_size,
                             static_cast<int64_t>(topology_.parallel_devices.size()));
  tp_rank_ = topology_.global_rank % mesh_.tensor_parallel;
  dp_rank_ = topology_.global_rank / mesh_.tensor_parallel;
  if (options_.state_dict_type != "full" && options_.state_dict_type != "sharded") {
    throw std::invalid_argument(
        "model_parallel: state_dict_type='" + options_.state_dict_type + "' is not a choice; "
        "valid: 'full' (rank 0 writes the unsplit model's state dict) or 'sharded' (a "
        "torch.distributed.checkpoint directory, each rank writing what it holds)");
  }
  const auto dp_topology = data_parallel_topology(topology_, mesh_);
  if (options_.data_parallel == "fsdp") {
    fsdp.state_dict_type = "full";  // (model_parallel decides what a checkpoint holds)
    dp_ = std::make_shared<FSDPStrategy>(dp_topology, process_group, fsdp);
    dp_is_fsdp_ = true;
  } else if (options_.data_parallel == "ddp") {
    dp_ = std::make_shared<DDPStrategy>(dp_topology, process_group, ddp);
  } else {
    throw std::invalid_argument("model_parallel: data_parallel='" + options_.data_parallel +
                                "' is not a choice; valid: 'fsdp' (shard each slice over the "
                                "data-parallel ranks) or 'ddp' (replicate it)");
  }
}

ModelParallelStrategy::~ModelParallelStrategy() {
  if (reducing_scaler_) reducing_scaler_->set_found_inf_reducer(nullptr);
  dp_.reset();
  if (tp_pg_.group) {
    try {
      tp_pg_.group->shutdown();
    } catch (...) {
    }
  }
}

tp::Group ModelParallelStrategy::tensor_parallel_group() const {
  tp::Group group;
  if (mesh_.tensor_parallel == 1) return group;
  if (!tp_pg_.group) {
    throw std::logic_error("model_parallel: the tensor-parallel group does not exist yet: call "
                           "fabric.launch() before building fabric::tp layers");
  }
  group.backend = tp_pg_.group->getBackend(root_device().type());
  group.rank = tp_rank_;
  group.size = mesh_.tensor_parallel;
  return group;
}

void ModelParallelStrategy::setup_environment() {
  if (has_process_group()) return;
  ParallelStrategy::setup_environment();
  // Every rank makes both groups, in this order (the splits are collective).
  tp_pg_ = create_sub_group(pg_, pg_options_, "tensor_parallel", static_cast<int>(dp_rank_),
                            static_cast<int>(tp_rank_), static_cast<int>(mesh_.tensor_parallel));
  dp_->adopt_process_group(create_sub_group(pg_, pg_options_, "data_parallel",
                                            static_cast<int>(tp_rank_), static_cast<int>(dp_rank_),
                                            static_cast<int>(mesh_.data_parallel)));
}

void ModelParallelStrategy::set_precision(std::shared_ptr<precision::Precision> plugin) {
  Strategy::set_precision(plugin);
  dp_->set_precision(plugin);
  if (reducing_scaler_) reducing_scaler_->set_found_inf_reducer(nullptr);
  reducing_scaler_ = nullptr;
  // Tensor-parallel ranks hold different gradients: one inf among them must
  // skip the step everywhere (the data-parallel strategy's own reducer, over its
  // group only, is replaced).
  if (auto* scaler = precision().scaler()) {
    scaler->set_found_inf_reducer([this](double found) { return all_reduce_value(found, ReduceOp::kMax); });
    reducing_scaler_ = scaler;
  }
}

const tp::Split* ModelParallelStrategy::split_of(const at::Tensor& param) const {
  auto it = splits_.find(param.unsafeGetTensorImpl());
  return it == splits_.end() ? nullptr : &it->second.second;
}

void ModelParallelStrategy::setup_module(torch::nn::Module& module) {
  module.to(root_device());
  for (const auto& child : module.modules(/*include_self=*/true)) {
    const auto* layer = dynamic_cast<const tp::ParallelLayer*>(child.get());
    if (!layer) continue;
    if (layer->group().size != mesh_.tensor_parallel) {
      throw std::invalid_argument(
          "model_parallel: a fabric::tp layer (" + child->name() + ") was built for a "
          "tensor-parallel group of " + std::to_string(layer->group().size) + ", but this job's is " +
          std::to_string(mesh_.tensor_parallel) + "; build the model after fabric.launch() with "
          "fabric::tp::tensor_parallel_group(fabric.strategy())");
    }
    for (const auto& [param, split] : layer->split_parameters()) {
      splits_[param.unsafeGetTensorImpl()] = {param, split};
    }
  }
  if (mesh_.tensor_parallel > 1) {
    // Replicated state must be equal within a tensor-parallel group (every rank
    // computes with it on the same batch): tensor-parallel rank 0's.
    broadcast_module_state(module, *tensor_parallel_group().backend,
                           [this](const at::Tensor& p) { return split_of(p) == nullptr; });
  }
  dp_->setup_module(module);
}

precision::ScopePtr ModelParallelStrategy::forward_context(torch::nn::Module& module) {
  return dp_->forward_context(module);
}

void ModelParallelStrategy::setup_optimizer(torch::optim::Optimizer& optimizer) {
  dp_->setup_optimizer(optimizer);
}

at::Tensor ModelParallelStrategy::optimizer_step(torch::optim::Optimizer& optimizer,
                                                 const precision::LossClosure& closure) {
  return dp_->optimizer_step(optimizer, closure);
}

void ModelParallelStrategy::backward(const at::Tensor& loss) { dp_->backward(loss); }

void ModelParallelStrategy::set_gradient_sync(bool enabled) { dp_->set_gradient_sync(enabled); }
bool ModelParallelStrategy::gradient_sync() const { return dp_->gradient_sync(); }

double ModelParallelStrategy::clip_gradients_norm(torch::nn::Module* /*module*/,
                                                  torch::optim::Optimizer& optimizer,
                                                  double max_norm, double norm_type,
                                                  bool error_if_nonfinite) {
  // Each gradient counted once over the world: under fsdp a rank's gradient
  // pieces are its own along the data-parallel dimension, under ddp every
  // data-parallel rank holds the same; a replicated parameter's gradient is the
  // same on every tensor-parallel rank.
  const double dp = dp_is_fsdp_ ? 1.0 : static_cast<double>(mesh_.data_parallel);
  const double tp = static_cast<double>(mesh_.tensor_parallel);
  return clip_pieces_norm(optimizer, max_norm, norm_type, error_if_nonfinite,
                          [&](const at::Tensor& p) { return split_of(p) ? 1.0 / dp : 1.0 / (dp * tp); });
}

void ModelParallelStrategy::clip_gradients_value(torch::nn::Module* module,
                                                 torch::optim::Optimizer& optimizer, double clip_val) {
  dp_->clip_gradients_value(module, optimizer, clip_val);
}

// Inside the data-parallel strategy's full state (each rank's slices whole),
// every split parameter and its per-element optimizer state gathered over the
// tensor-parallel group: the unsplit model's tensors. After a load, each rank
// keeps its slice of what was loaded.
class ModelParallelStrategy::WholeStateScope : public precision::Scope {
 public:
  WholeStateScope(ModelParallelStrategy& strategy, bool loading)
      : strategy_(strategy), loading_(loading), group_(strategy.tensor_parallel_group()) {}
  ~WholeStateScope() override {
    try {
      leave();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "torchfabric: model_parallel: splitting after a checkpoint failed: %s\n",
                   e.what());
    }
  }
  void enter(const std::vector<torch::nn::Module*>& modules,
             const std::vector<torch::optim::Optimizer*>& optimizers, precision::ScopePtr inner) {
    inner_ = std::move(inner);
    if (group_.size == 1) return;
    torch::NoGradGuard no_grad;
    std::unordered_map<const void*, bool> seen;
    for (auto* module : modules) {
      for (auto& p : module->parameters()) {
        const auto* split = strategy_.split_of(p);
        if (!split || !seen.emplace(p.unsafeGetTensorImpl(), true).second) continue;
        at::Tensor local = p.data();
        at::Tensor full;
        if (loading_) {
          auto sizes = local.sizes().vec();
          sizes[static_cast<size_t>(split->dim)] *= group_.size;
          full = at::empty(sizes, local.options());  // the load writes into it
        } else {
          full = tp::unshard(tp::all_gather(group_, local), *split);
        }
        params_.push_back({p, local, *split});
        p.set_data(full);
      }
    }
    optimizers_ = optimizers;
    if (loading_) return;  // a load replaces the state; leave() splits what it loaded
    for_each_split_slot([&](at::Tensor* slot, const at::Tensor& /*param*/, const tp::Split& split) {
      slots_.push_back({slot, *slot});
      *slot = tp::unshard(tp::all_gather(group_, *slot), split);
    });
  }

 private:
  // Every defined per-element optimizer state tensor of a split parameter.
  template <typename F>
  void for_each_split_slot(F&& fn) const {
    for (auto* optimizer : optimizers_) {
      for (const auto& p : optimizer_parameters(*optimizer)) {
        const auto* split = strategy_.split_of(p);
        auto it = optimizer->state().find(p.unsafeGetTensorImpl());
        if (!split || it == optimizer->state().end()) continue;
        for (auto* slot : optim::codec_for(optimizer->defaults()).per_element_state(*it->second)) {
          if (slot->defined()) fn(slot, p, *split);
        }
      }
    }
  }

  void leave() {
    if (group_.size != 1) {
      torch::NoGradGuard no_grad;
      for (auto& [param, local, split] : params_) {
        at::Tensor loaded = param.data();
        param.set_data(local);
        if (loading_) local.copy_(tp::shard_of(loaded, split, group_.rank, group_.size));
      }
      for (auto& [slot, local] : slots_) *slot = local;
      if (loading_) {
        // Loaded state is the unsplit model's: keep this rank's slice.
        for_each_split_slot([&](at::Tensor* slot, const at::Tensor& p, const tp::Split& split) {
          if (slot->dim() > split.dim && slot->size(split.dim) == p.size(split.dim) * group_.size) {
            *slot = tp::shard_of(*slot, split, group_.rank, group_.size);
          }
        });
      }
    }
    inner_.reset();  // then the data-parallel strategy leaves its own full state
  }
  struct Param {
    at::Tensor param, local;
    tp::Split split;
  };
  ModelParallelStrategy& strategy_;
  bool loading_;
  tp::Group group_;
  precision::ScopePtr inner_;
  std::vector<Param> params_;
  std::vector<std::pair<at::Tensor*, at::Tensor>> slots_;
  std::vector<torch::optim::Optimizer*> optimizers_;
};

std::optional<Strategy::ParameterShard> ModelParallelStrategy::parameter_shard(const at::Tensor& param) const {
  auto inner = dp_->parameter_shard(param);  // fsdp's piece of this rank's tensor
  const auto* split = split_of(param);
  if (!split || mesh_.tensor_parallel == 1) {
    // Whole on this rank (rank 0 writes it), or fsdp's piece of a tensor every
    // tensor-parallel peer holds alike: tensor-parallel rank 0 writes it.
    if (inner) inner->owner = tp_rank_ == 0;
    return inner;
  }
  // This rank's slice, as runs of the unsplit tensor: for every index before
  // the split dimension and every block, `part` rows of `inner_n` elements.
  const std::vector<int64_t> local = inner ? inner->full_shape : param.sizes().vec();
  const int64_t begin = inner ? inner->flat_offset : 0, end = begin + param.numel();
  const auto d = static_cast<size_t>(split->dim);
  ParameterShard out;
  out.full_shape = local;
  out.full_shape[d] *= mesh_.tensor_parallel;
  out.owner = dp_is_fsdp_ || dp_rank_ == 0;  // ddp replicas hold the same slice
  int64_t outer = 1, inner_n = 1;
  for (size_t i = 0; i < d; ++i) outer *= local[i];
  for (size_t i = d + 1; i < local.size(); ++i) inner_n *= local[i];
  const int64_t part = local[d] / split->stride, run = part * inner_n;
  const int64_t full_d = out.full_shape[d], block = full_d / split->stride;
  for (int64_t o = 0; o < outer; ++o) {
    for (int64_t b = 0; b < split->stride; ++b) {
      const int64_t local_start = (o * split->stride + b) * run;
      const int64_t lo = std::max(begin, local_start), hi = std::min(end, local_start + run);
      if (hi <= lo) continue;
      const int64_t full_start = o * full_d * inner_n + (b * block + tp_rank_ * part) * inner_n;
      out.ranges.emplace_back(full_start + (lo - local_start), hi - lo);
    }
  }
  return out;
}

at::Tensor ModelParallelStrategy::parameter_of(const at::Tensor& optimizer_tensor) const {
  return dp_->parameter_of(optimizer_tensor);
}

precision::ScopePtr ModelParallelStrategy::sharded_state_context(
    const std::vector<torch::nn::Module*>& modules,
    const std::vector<torch::optim::Optimizer*>& optimizers, bool loading) {
  return dp_->sharded_state_context(modules, optimizers, loading);
}

precision::ScopePtr ModelParallelStrategy::full_state_context(
    const std::vector<torch::nn::Module*>& modules,
    const std::vector<torch::optim::Optimizer*>& optimizers, bool loading) {
  auto scope = std::make_unique<WholeStateScope>(*this, loading);
  scope->enter(modules, optimizers, dp_->full_state_context(modules, optimizers, loading));
  return scope;
}

}  // namespace fabric::strategies
