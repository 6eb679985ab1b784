#include "checkpoint/state_dict.h"

#include <algorithm>
#include <map>
#include <sstream>
#include <stdexcept>

#include <ATen/ops/scalar_tensor.h>
#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>

#include "optim/codec.h"

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
        optim::codec_for(group.options()).save_state(*it->second, s);
        state.insert(index, s);
      }
      ++index;
    }
    optim::codec_for(group.options()).save_group(group.options(), g);
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
    const auto& codec = optim::codec_for(group.options());
    prepared.options.push_back(group.options().clone());
    codec.load_group(optim::GroupEntry(g, what), *prepared.options.back());
    for (size_t pi = 0; pi < group.params().size(); ++pi, ++index) {
      const auto& param = group.params()[pi];
      void* key = param.unsafeGetTensorImpl();
      // Python numbers parameters (torch.optim); FSDP's optim_state_dict and
      // distributed checkpoints key them by name: either way the group lists
      // them in the optimizer's order.
      const c10::IValue id = ids.get(pi);
      if (!id.isInt() && !id.isString()) {
        throw std::runtime_error(what + ": parameter group " + std::to_string(gi) + " lists a " +
                                 id.tagKind() + " among its params (expected indices or names)");
      }
      const std::string shown = id.isInt() ? std::to_string(id.toInt()) : "'" + id.toStringRef() + "'";
      auto it = state.find(id);
      if (it == state.end()) {
        prepared.states.emplace_back(key, nullptr);
        continue;
      }
      if (!it->value().isGenericDict()) {
        throw std::runtime_error(what + ": the state of parameter " + shown +
                                 " is a " + it->value().tagKind() + ", not a dict");
      }
      auto restored = codec.load_state(
          optim::StateEntry(it->value().toGenericDict(), param, id.isInt() ? id.toInt() : index, what));
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
