// How an optimizer's state reads and writes as PyTorch's optimizer state dict,
// one codec per optimizer type.
//
// A checkpoint holds {"state": {index: {slot: tensor, "step": ...}},
// "param_groups": [{hyper-parameters..., "params": [...]}]} with Python's key
// names, so the same file continues in Python's torch.optim. LibTorch keeps an
// optimizer's options and per-parameter state in types of its own
// (AdamOptions/AdamParamState, ...); a codec maps one such pair to and from that
// layout, and also names the per-parameter tensors shaped like the parameter
// (what FSDP shards). Built in: SGD, Adam, AdamW, RMSprop, Adagrad. A new
// optimizer type adds one codec through register_codec.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Dict.h>
#include <ATen/core/ivalue.h>

namespace torch::optim {
class OptimizerOptions;
class OptimizerParamState;
}  // namespace torch::optim

namespace fabric::optim {

using GenericDict = c10::impl::GenericDict;

// A parameter group's entry in a checkpoint; accessors throw naming the key.
class GroupEntry {
 public:
  GroupEntry(GenericDict dict, std::string what) : dict_(std::move(dict)), what_(std::move(what)) {}
  double number(const std::string& key) const;  // int, float or 0-d tensor
  bool flag(const std::string& key) const;
  std::pair<double, double> pair(const std::string& key) const;  // e.g. betas
 private:
  c10::IValue get(const std::string& key) const;
  GenericDict dict_;
  std::string what_;
};

// A parameter's state entry; tensors are checked against the parameter's shape
// and come back as copies with its dtype and device.
class StateEntry {
 public:
  StateEntry(GenericDict dict, at::Tensor param, int64_t index, std::string what)
      : dict_(std::move(dict)), param_(std::move(param)), index_(index), what_(std::move(what)) {}
  at::Tensor tensor(const char* name) const;  // undefined when absent or None
  int64_t step() const;                       // 0 when absent
 private:
  GenericDict dict_;
  at::Tensor param_;
  int64_t index_;
  std::string what_;
};

class OptimizerCodec {
 public:
  virtual ~OptimizerCodec() = default;
  virtual std::string name() const = 0;  // e.g. "Adam"
  // Whether this codec reads and writes these options (and their param state).
  virtual bool handles(const torch::optim::OptimizerOptions& options) const = 0;
  // A group's hyper-parameters, with Python's names (without "params").
  virtual void save_group(const torch::optim::OptimizerOptions& options, GenericDict& out) const = 0;
  virtual void load_group(const GroupEntry& in, torch::optim::OptimizerOptions& options) const = 0;
  virtual void save_state(const torch::optim::OptimizerParamState& state, GenericDict& out) const = 0;
  virtual std::unique_ptr<torch::optim::OptimizerParamState> load_state(const StateEntry& in) const = 0;
  // The state tensors shaped like the parameter (undefined ones included).
  virtual std::vector<at::Tensor*> per_element_state(
      torch::optim::OptimizerParamState& state) const = 0;
};

// The codec for these options; throws std::invalid_argument naming the
// optimizers that have one.
const OptimizerCodec& codec_for(const torch::optim::OptimizerOptions& options);
// Adds a codec; it is asked before the built-in ones.
void register_codec(std::shared_ptr<const OptimizerCodec> codec);
// "SGD, Adam, AdamW, RMSprop, Adagrad" and any registered ones.
std::string codec_names();

// The float32 0-d tensor Python keeps a step count in.
at::Tensor step_tensor(int64_t step);

}  // namespace fabric::optim
