#include "strategies/auto_wrap.h"

#include <ostream>
#include <utility>

#include <torch/nn/module.h>
#include <torch/nn/modules/container/any.h>
#include <torch/nn/modules/container/sequential.h>

#include "strategies/sharding_unit.h"

namespace fabric::strategies {
namespace {

// Stands in for a Sequential child: registers the child's own parameters,
// buffers and submodules under the same names, and runs its forward as a unit.
class SequentialUnitImpl : public torch::nn::Module {
 public:
  explicit SequentialUnitImpl(torch::nn::AnyModule inner) : inner_(std::move(inner)) {
    auto module = inner_.ptr();
    for (const auto& child : module->named_children()) register_module(child.key(), child.value());
    for (const auto& p : module->named_parameters(/*recurse=*/false)) {
      register_parameter(p.key(), p.value(), p.value().requires_grad());
    }
    for (const auto& b : module->named_buffers(/*recurse=*/false)) register_buffer(b.key(), b.value());
    if (!module->is_training()) Module::train(false);
  }
  at::Tensor forward(at::Tensor input) {
    return run_sharding_unit(
        *this, [this](at::Tensor in) { return inner_.forward(std::move(in)); }, std::move(input));
  }
  void train(bool on) override {
    Module::train(on);
    inner_.ptr()->train(on);  // the child's own flag (Dropout, BatchNorm read it)
  }
  void pretty_print(std::ostream& stream) const override {
    stream << "fsdp unit(";
    inner_.ptr()->pretty_print(stream);
    stream << ")";
  }

 private:
  torch::nn::AnyModule inner_;
};

int64_t num_params(const torch::nn::Module& module) {
  int64_t n = 0;
  for (const auto& p : module.parameters()) n += p.numel();
  return n;
}

std::string last_component(std::string name) {
  const auto colon = name.rfind("::");
  if (colon != std::string::npos) name = name.substr(colon + 2);
  if (name.size() > 4 && name.compare(name.size() - 4, 4, "Impl") == 0) name.resize(name.size() - 4);
  return name;
}

}  // namespace

AutoWrapPolicy wrap_sequential_children() {
  return [](const torch::nn::Module&, const std::string&, int64_t) { return true; };
}

AutoWrapPolicy wrap_module_types(std::vector<std::string> type_names) {
  for (auto& name : type_names) name = last_component(name);
  return [type_names](const torch::nn::Module& module, const std::string&, int64_t) {
    const auto name = last_component(module.name());
    for (const auto& wanted : type_names) {
      if (name == wanted) return true;
    }
    return false;
  };
}

AutoWrapPolicy wrap_min_num_params(int64_t min_num_params) {
  return [min_num_params](const torch::nn::Module&, const std::string&, int64_t n) {
    return n >= min_num_params;
  };
}

std::vector<std::shared_ptr<torch::nn::Module>> apply_auto_wrap(torch::nn::Module& root,
                                                                const AutoWrapPolicy& policy) {
  std::vector<std::shared_ptr<torch::nn::Module>> installed;
  // Innermost Sequentials first, so an outer adapter registers inner adapters.
  std::vector<std::pair<std::string, torch::nn::SequentialImpl*>> sequentials;
  if (auto* self = dynamic_cast<torch::nn::SequentialImpl*>(&root)) sequentials.emplace_back("", self);
  for (const auto& item : root.named_modules("", /*include_self=*/false)) {
    if (auto* seq = dynamic_cast<torch::nn::SequentialImpl*>(item.value().get())) {
      sequentials.emplace_back(item.key(), seq);
    }
  }
  for (auto it = sequentials.rbegin(); it != sequentials.rend(); ++it) {
    auto* seq = it->second;
    const auto children = seq->named_children();
    for (size_t i = 0; i < seq->size(); ++i) {
      auto slot = seq->begin() + static_cast<std::ptrdiff_t>(i);
      auto child = slot->ptr();
      if (dynamic_cast<SequentialUnitImpl*>(child.get())) continue;
      const std::string& key = children[i].key();
      const std::string path = it->first.empty() ? key : it->first + "." + key;
      // Children marked with fabric::Sharded are wrapped too: a Sequential calls
      // the module, not the holder.
      if (!is_marked_sharding_unit(*child) && !(policy && policy(*child, path, num_params(*child)))) {
        continue;
      }
      auto adapter = std::make_shared<SequentialUnitImpl>(*slot);
      seq->replace_module(key, adapter);
      *slot = torch::nn::AnyModule(adapter);
      installed.push_back(adapter);
    }
  }
  return installed;
}

}  // namespace fabric::strategies
