#include "fabric/state_dict.h"

#include <algorithm>
#include <map>
#include <sstream>
#include <stdexcept>

#include <ATen/ops/scalar_tensor.h>
#include <torch/nn/module.h>
#include <torch/optim/adagrad.h>
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/rmsprop.h>
#include <torch/optim/sgd.h>

namespace fabric {
namespace {

std::string shape(at::IntArrayRef sizes) {
  std::ostringstream out;
  out << sizes;
  return out.str();
}

using GenericDict = c10::impl::GenericDict;

GenericDict new_dict() { return GenericDict(c10::StringType::get(), c10::AnyType::get()); }

c10::IValue get(const GenericDict& dict, const std::string& key, const std::string& what) {
  auto it = dict.find(key);
  if (it == dict.end()) {
    throw std::runtime_error(what + ": the checkpoint's optimizer state has no '" + key + "'");
  }
  return it->value();
}

double as_double(const c10::IValue& v) {
  if (v.isDouble()) return v.toDouble();
  if (v.isInt()) return static_cast<double>(v.toInt());
  if (v.isTensor()) return v.toTensor().item<double>();
  throw std::runtime_error("expected a number in the optimizer state, got " + v.tagKind());
}

bool as_bool(const c10::IValue& v) { return v.isBool() ? v.toBool() : as_double(v) != 0; }

int64_t as_step(const c10::IValue& v) { return static_cast<int64_t>(as_double(v)); }

at::Tensor step_tensor(int64_t step) {
  return at::scalar_tensor(static_cast<double>(step), at::TensorOptions().dtype(at::kFloat));
}

// The flat index of every parameter, in param-group order (Python's numbering).
std::vector<at::Tensor> all_params(const torch::optim::Optimizer& optimizer) {
  std::vector<at::Tensor> out;
  for (const auto& group : optimizer.param_groups()) {
    for (const auto& p : group.params()) out.push_back(p);
  }
  return out;
}

// Adam and AdamW have the same options and state fields but no common base class.
template <typename ParamState>
void save_adam_state(GenericDict& s, const ParamState& a) {
  s.insert("step", step_tensor(a.step()));
  s.insert("exp_avg", a.exp_avg());
  s.insert("exp_avg_sq", a.exp_avg_sq());
  if (a.max_exp_avg_sq().defined()) s.insert("max_exp_avg_sq", a.max_exp_avg_sq());
}

template <typename Options>
void save_adam_group(GenericDict& g, const Options& o, bool decoupled_weight_decay) {
  g.insert("lr", o.lr());
  g.insert("betas", c10::ivalue::Tuple::create(std::get<0>(o.betas()), std::get<1>(o.betas())));
  g.insert("eps", o.eps());
  g.insert("weight_decay", o.weight_decay());
  g.insert("amsgrad", o.amsgrad());
  g.insert("decoupled_weight_decay", decoupled_weight_decay);
}

template <typename Options>
void load_adam_group(Options& o, const GenericDict& g, const std::string& what) {
  auto betas = get(g, "betas", what).toTupleRef().elements();
  o.lr(as_double(get(g, "lr", what)))
      .eps(as_double(get(g, "eps", what)))
      .weight_decay(as_double(get(g, "weight_decay", what)))
      .amsgrad(as_bool(get(g, "amsgrad", what)))
      .betas(std::make_tuple(as_double(betas[0]), as_double(betas[1])));
}

template <typename ParamState, typename Step, typename TensorOf>
std::unique_ptr<torch::optim::OptimizerParamState> load_adam_state(Step step, TensorOf tensor) {
  auto ps = std::make_unique<ParamState>();
  ps->step(step()).exp_avg(tensor("exp_avg")).exp_avg_sq(tensor("exp_avg_sq"));
  if (auto m = tensor("max_exp_avg_sq"); m.defined()) ps->max_exp_avg_sq(m);
  return ps;
}

}  // namespace

std::string LoadReport::describe() const {
  std::string out;
  auto list = [&](const char* title, const std::vector<std::string>& names) {
    if (names.empty()) return;
    out += std::string(out.empty() ? "" : "; ") + title + ": ";
    for (size_t i = 0; i < names.size(); ++i) out += (i ? ", " : "") + names[i];
  };
  list("missing from the checkpoint", missing);
  list("unexpected in the checkpoint", unexpected);
  list("shape mismatch", mismatched);
  return out;
}

c10::Dict<std::string, at::Tensor> module_state_dict(const torch::nn::Module& module) {
  c10::Dict<std::string, at::Tensor> out;
  for (const auto& item : module.named_parameters(/*recurse=*/true)) {
    out.insert(item.key(), item.value().detach());
  }
  for (const auto& item : module.named_buffers(/*recurse=*/true)) {
    out.insert(item.key(), item.value().detach());
  }
  return out;
}

LoadReport check_module_state_dict(const torch::nn::Module& module, const c10::IValue& state_dict,
                                   const std::string& what) {
  // A const module's named_parameters() is available; the check copies nothing.
  auto& mutable_module = const_cast<torch::nn::Module&>(module);
  return load_module_state_dict(mutable_module, state_dict, /*strict=*/false, what,
                                /*dry_run=*/true);
}

LoadReport load_module_state_dict(torch::nn::Module& module, const c10::IValue& state_dict,
                                  bool strict, const std::string& what, bool dry_run) {
  if (!state_dict.isGenericDict()) {
    throw std::runtime_error(what + ": the checkpoint entry is a " + state_dict.tagKind() +
                             ", not a state dict of tensors");
  }
  const auto dict = state_dict.toGenericDict();
  std::map<std::string, at::Tensor> targets;
  for (const auto& item : module.named_parameters(true)) targets[item.key()] = item.value();
  for (const auto& item : module.named_buffers(true)) targets[item.key()] = item.value();
  LoadReport report;
  std::vector<std::pair<at::Tensor, at::Tensor>> copies;
  for (const auto& [name, target] : targets) {
    auto it = dict.find(name);
    if (it == dict.end()) {
      report.missing.push_back(name);
      continue;
    }
    if (!it->value().isTensor()) {
      report.mismatched.push_back(name + ": checkpoint holds a " + it->value().tagKind());
      continue;
    }
    const auto& source = it->value().toTensor();
    if (source.sizes() != target.sizes()) {
      report.mismatched.push_back(name + ": checkpoint " + shape(source.sizes()) + " vs " + what +
                                  " " + shape(target.sizes()));
      continue;
    }
    copies.emplace_back(target, source);
  }
  for (const auto& item : dict) {
    const auto key = item.key().toStringRef();
    if (!targets.count(key)) report.unexpected.push_back(key);
  }
  std::sort(report.missing.begin(), report.missing.end());
  std::sort(report.unexpected.begin(), report.unexpected.end());
  std::sort(report.mismatched.begin(), report.mismatched.end());
  if (strict && !report.clean()) {
    throw std::runtime_error("cannot load " + what + " strictly: " + report.describe());
  }
  if (dry_run) return report;
  torch::NoGradGuard no_grad;
  for (auto& [target, source] : copies) target.copy_(source);
  return report;
}

c10::IValue optimizer_state_dict(const torch::optim::Optimizer& optimizer) {
  using namespace torch::optim;
  const auto params = all_params(optimizer);
  auto state = c10::impl::GenericDict(c10::IntType::get(), c10::AnyType::get());
  c10::impl::GenericList groups(c10::AnyType::get());
  const auto& states = optimizer.state();
  int64_t index = 0;
  for (const auto& group : optimizer.param_groups()) {
    auto g = new_dict();
    // Untyped containers: Python's torch.load (weights_only) refuses typed ones.
    c10::impl::GenericList ids(c10::AnyType::get());
    for (const auto& p : group.params()) {
      ids.push_back(c10::IValue(index));
      auto it = states.find(p.unsafeGetTensorImpl());
      if (it != states.end()) {
        auto s = new_dict();
        const auto* raw = it->second.get();
        if (auto* a = dynamic_cast<const AdamParamState*>(raw)) {
          save_adam_state(s, *a);
        } else if (auto* w = dynamic_cast<const AdamWParamState*>(raw)) {
          save_adam_state(s, *w);
        } else if (auto* m = dynamic_cast<const SGDParamState*>(raw)) {
          if (m->momentum_buffer().defined()) s.insert("momentum_buffer", m->momentum_buffer());
        } else if (auto* r = dynamic_cast<const RMSpropParamState*>(raw)) {
          s.insert("step", step_tensor(r->step()));
          s.insert("square_avg", r->square_avg());
          if (r->momentum_buffer().defined()) s.insert("momentum_buffer", r->momentum_buffer());
          if (r->grad_avg().defined()) s.insert("grad_avg", r->grad_avg());
        } else if (auto* ag = dynamic_cast<const AdagradParamState*>(raw)) {
          s.insert("step", step_tensor(ag->step()));
          s.insert("sum", ag->sum());
        } else {
          throw std::invalid_argument(
              "saving this optimizer's state is not supported; supported: SGD, Adam, AdamW, "
              "RMSprop, Adagrad");
        }
        state.insert(index, s);
      }
      ++index;
    }
    const auto& base = group.options();
    if (auto* o = dynamic_cast<const AdamOptions*>(&base)) {
      save_adam_group(g, *o, /*decoupled_weight_decay=*/false);
    } else if (auto* o = dynamic_cast<const AdamWOptions*>(&base)) {
      save_adam_group(g, *o, /*decoupled_weight_decay=*/true);
    } else if (auto* o = dynamic_cast<const SGDOptions*>(&base)) {
      g.insert("lr", o->lr());
      g.insert("momentum", o->momentum());
      g.insert("dampening", o->dampening());
      g.insert("weight_decay", o->weight_decay());
      g.insert("nesterov", o->nesterov());
    } else if (auto* o = dynamic_cast<const RMSpropOptions*>(&base)) {
      g.insert("lr", o->lr());
      g.insert("alpha", o->alpha());
      g.insert("eps", o->eps());
      g.insert("weight_decay", o->weight_decay());
      g.insert("momentum", o->momentum());
      g.insert("centered", o->centered());
    } else if (auto* o = dynamic_cast<const AdagradOptions*>(&base)) {
      g.insert("lr", o->lr());
      g.insert("lr_decay", o->lr_decay());
      g.insert("weight_decay", o->weight_decay());
      g.insert("initial_accumulator_value", o->initial_accumulator_value());
      g.insert("eps", o->eps());
    } else {
      throw std::invalid_argument(
          "saving this optimizer is not supported; supported: SGD, Adam, AdamW, RMSprop, Adagrad");
    }
    // Python's defaults for the flags LibTorch does not have.
    g.insert("maximize", false);
    g.insert("foreach", c10::IValue());
    g.insert("differentiable", false);
    g.insert("capturable", false);
    g.insert("fused", c10::IValue());
    g.insert("params", ids);
    groups.push_back(g);
  }
  auto out = new_dict();
  out.insert("state", state);
  out.insert("param_groups", groups);
  return out;
}

namespace {

// Everything a load would change, built before anything changes.
struct PreparedOptimizerState {
  std::vector<std::unique_ptr<torch::optim::OptimizerOptions>> options;  // per group
  std::vector<std::pair<void*, std::unique_ptr<torch::optim::OptimizerParamState>>> states;  // null: none
};

PreparedOptimizerState prepare_optimizer_state(const torch::optim::Optimizer& optimizer,
                                               const c10::IValue& state_dict,
                                               const std::string& what) {
  using namespace torch::optim;
  PreparedOptimizerState prepared;
  if (!state_dict.isGenericDict()) {
    throw std::runtime_error(what + ": the checkpoint entry is a " + state_dict.tagKind() +
                             ", not an optimizer state dict");
  }
  const auto dict = state_dict.toGenericDict();
  const auto groups = get(dict, "param_groups", what).toList();
  const auto state = get(dict, "state", what).toGenericDict();
  const auto& my_groups = optimizer.param_groups();
  if (groups.size() != my_groups.size()) {
    throw std::runtime_error(what + ": the checkpoint has " + std::to_string(groups.size()) +
                             " parameter group(s), the optimizer " +
                             std::to_string(my_groups.size()));
  }
  int64_t index = 0;
  for (size_t gi = 0; gi < my_groups.size(); ++gi) {
    const auto& group = my_groups[gi];
    if (!groups.get(gi).isGenericDict()) {
      throw std::runtime_error(what + ": parameter group " + std::to_string(gi) + " is a " +
                               groups.get(gi).tagKind() + ", not a dict");
    }
    const auto g = groups.get(gi).toGenericDict();
    const auto ids = get(g, "params", what).toList();
    if (ids.size() != group.params().size()) {
      throw std::runtime_error(what + ": parameter group " + std::to_string(gi) +
                               " has " + std::to_string(ids.size()) +
                               " parameter(s) in the checkpoint and " +
                               std::to_string(group.params().size()) + " in the optimizer");
    }
    prepared.options.push_back(group.options().clone());
    auto& base = *prepared.options.back();
    if (auto* o = dynamic_cast<AdamOptions*>(&base)) {
      load_adam_group(*o, g, what);
    } else if (auto* o = dynamic_cast<AdamWOptions*>(&base)) {
      load_adam_group(*o, g, what);
    } else if (auto* o = dynamic_cast<SGDOptions*>(&base)) {
      o->lr(as_double(get(g, "lr", what))).momentum(as_double(get(g, "momentum", what)))
          .dampening(as_double(get(g, "dampening", what)))
          .weight_decay(as_double(get(g, "weight_decay", what)))
          .nesterov(as_bool(get(g, "nesterov", what)));
    } else if (auto* o = dynamic_cast<RMSpropOptions*>(&base)) {
      o->lr(as_double(get(g, "lr", what))).alpha(as_double(get(g, "alpha", what)))
          .eps(as_double(get(g, "eps", what)))
          .weight_decay(as_double(get(g, "weight_decay", what)))
          .momentum(as_double(get(g, "momentum", what)))
          .centered(as_bool(get(g, "centered", what)));
    } else if (auto* o = dynamic_cast<AdagradOptions*>(&base)) {
      o->lr(as_double(get(g, "lr", what))).lr_decay(as_double(get(g, "lr_decay", what)))
          .weight_decay(as_double(get(g, "weight_decay", what)))
          .initial_accumulator_value(as_double(get(g, "initial_accumulator_value", what)))
          .eps(as_double(get(g, "eps", what)));
    } else {
      throw std::invalid_argument(
          "loading this optimizer is not supported; supported: SGD, Adam, AdamW, RMSprop, Adagrad");
    }
    for (size_t pi = 0; pi < group.params().size(); ++pi, ++index) {
      const auto& param = group.params()[pi];
      void* key = param.unsafeGetTensorImpl();
      const int64_t id = ids.get(pi).toInt();
      auto it = state.find(id);
      if (it == state.end()) {
        prepared.states.emplace_back(key, nullptr);
        continue;
      }
      if (!it->value().isGenericDict()) {
        throw std::runtime_error(what + ": the state of parameter " + std::to_string(id) +
                                 " is a " + it->value().tagKind() + ", not a dict");
      }
      const auto s = it->value().toGenericDict();
      auto tensor = [&](const char* name) -> at::Tensor {
        auto t = s.find(name);
        if (t == s.end() || t->value().isNone()) return {};
        auto value = t->value().toTensor();
        if (value.sizes() != param.sizes()) {
          throw std::runtime_error(what + ": state '" + name + "' of parameter " +
                                   std::to_string(id) + " has shape " + shape(value.sizes()) +
                                   " but the parameter has " + shape(param.sizes()));
        }
        return value.to(param.options()).clone();
      };
      auto step = [&]() -> int64_t {
        auto t = s.find("step");
        return t == s.end() ? 0 : as_step(t->value());
      };
      std::unique_ptr<OptimizerParamState> restored;
      if (dynamic_cast<AdamOptions*>(&base)) {
        restored = load_adam_state<AdamParamState>(step, tensor);
      } else if (dynamic_cast<AdamWOptions*>(&base)) {
        restored = load_adam_state<AdamWParamState>(step, tensor);
      } else if (dynamic_cast<SGDOptions*>(&base)) {
        auto ps = std::make_unique<SGDParamState>();
        if (auto m = tensor("momentum_buffer"); m.defined()) ps->momentum_buffer(m);
        restored = std::move(ps);
      } else if (dynamic_cast<RMSpropOptions*>(&base)) {
        auto ps = std::make_unique<RMSpropParamState>();
        ps->step(step()).square_avg(tensor("square_avg"));
        if (auto m = tensor("momentum_buffer"); m.defined()) ps->momentum_buffer(m);
        if (auto m = tensor("grad_avg"); m.defined()) ps->grad_avg(m);
        restored = std::move(ps);
      } else {
        auto ps = std::make_unique<AdagradParamState>();
        ps->step(step()).sum(tensor("sum"));
        restored = std::move(ps);
      }
      prepared.states.emplace_back(key, std::move(restored));
    }
  }
  return prepared;
}

}  // namespace

void check_optimizer_state_dict(const torch::optim::Optimizer& optimizer,
                                const c10::IValue& state_dict, const std::string& what) {
  prepare_optimizer_state(optimizer, state_dict, what);
}

void load_optimizer_state_dict(torch::optim::Optimizer& optimizer, const c10::IValue& state_dict,
                               const std::string& what) {
  auto prepared = prepare_optimizer_state(optimizer, state_dict, what);
  auto& groups = optimizer.param_groups();
  for (size_t gi = 0; gi < groups.size(); ++gi) groups[gi].set_options(std::move(prepared.options[gi]));
  for (auto& [key, restored] : prepared.states) {
    if (restored) {
      optimizer.state()[key] = std::move(restored);
    } else {
      optimizer.state().erase(key);
    }
  }
}

}  // namespace fabric
