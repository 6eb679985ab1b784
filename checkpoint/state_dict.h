// Module and optimizer state dicts in PyTorch's own layout, as c10::IValues that
// torch::pickle_save writes and Python's torch.load reads back as plain dicts.
//  - module: {name: tensor} over parameters then buffers, with LibTorch's dotted
//    names (the same as Python's for the same architecture);
//  - optimizer: {"state": {index: {buffer: tensor}}, "param_groups": [{hyper-
//    parameters..., "params": [index...]}]} with Python's key names, for SGD,
//    Adam, AdamW, RMSprop and Adagrad ("step" is a float32 scalar tensor, as
//    Python keeps it).
#pragma once

#include <string>
#include <vector>

#include <ATen/core/Dict.h>
#include <ATen/core/ivalue.h>

namespace torch::nn {
class Module;
}
namespace torch::optim {
class Optimizer;
}

namespace fabric {

// What a state-dict load found; each entry names the key (and both shapes).
struct LoadReport {
  std::vector<std::string> missing;     // in the object, not in the checkpoint
  std::vector<std::string> unexpected;  // in the checkpoint, not in the object
  std::vector<std::string> mismatched;  // "name: checkpoint [2, 3] vs model [3, 2]"
  bool clean() const { return missing.empty() && unexpected.empty() && mismatched.empty(); }
  // One readable paragraph listing the problems.
  std::string describe() const;
};

c10::Dict<std::string, at::Tensor> module_state_dict(const torch::nn::Module& module);
// Copies matching tensors in place (keeping parameter identity). With strict, any
// problem throws std::runtime_error listing every missing, unexpected or
// mismatched name before anything is copied.
LoadReport load_module_state_dict(torch::nn::Module& module, const c10::IValue& state_dict,
                                  bool strict = true, const std::string& what = "module",
                                  bool dry_run = false);
// What load_module_state_dict would report, changing nothing.
LoadReport check_module_state_dict(const torch::nn::Module& module, const c10::IValue& state_dict,
                                   const std::string& what = "module");

c10::IValue optimizer_state_dict(const torch::optim::Optimizer& optimizer);
// Restores hyper-parameters and per-parameter state; throws std::runtime_error
// when the groups or parameter counts differ, naming both. All or nothing:
// everything is read and checked before the optimizer changes.
void load_optimizer_state_dict(torch::optim::Optimizer& optimizer, const c10::IValue& state_dict,
                               const std::string& what = "optimizer");
// Throws what load_optimizer_state_dict would throw, changing nothing.
void check_optimizer_state_dict(const torch::optim::Optimizer& optimizer,
                                const c10::IValue& state_dict,
                                const std::string& what = "optimizer");

}  // namespace fabric
