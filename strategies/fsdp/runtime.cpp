// fsdp at run time: gathering and freeing units around their forward and
// backward, reducing their gradients to this rank's pieces, the root scope.
#include "strategies/fsdp/units.h"

namespace fabric::strategies {

using namespace fsdp_detail;

void FSDPStrategy::unshard(FlatUnit& unit) {
  if (unit.gathered()) return;
  const bool check = check_order_ == CheckOrder::kAlways || (check_order_ == CheckOrder::kFirstStep && !stepped_);
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
                        sharding_ == Sharding::kFullShard && options_.reshard_after_forward;
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

}  // namespace fabric::strategies
