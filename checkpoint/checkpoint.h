// Checkpoints in PyTorch's own file format (the zip archive torch::pickle_save
// writes): Python's torch.load(path) returns plain dicts and tensors, and files
// that Python's torch.save wrote of such dicts load here.
//
//   fabric.save("ckpt.pt", {{"model", net}, {"optimizer", opt}, {"epoch", epoch},
//                           {"rng", fabric::RngState::capture()}});
//   fabric::State state{{"model", net}, {"optimizer", opt}, {"epoch", 0}};
//   auto rest = fabric.load("ckpt.pt", state);   // in place; state["epoch"] updated
//
// Writes are atomic: a temporary file in the target's directory, flushed and
// fsynced, renamed over the target, then the directory fsynced. A crash mid-save
// leaves the previous checkpoint as it was.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>

#include "checkpoint/rng_state.h"
#include "checkpoint/state_dict.h"

namespace torch::nn {
class Module;
}
namespace torch::optim {
class Optimizer;
}

namespace fabric {

class StateValue;
// Names to what is saved under them; nested maps nest.
using State = std::map<std::string, StateValue>;

// One entry of a checkpoint: a module (its state dict), an optimizer (its state
// dict in Python's layout), RNG state, or a plain value (tensor, number, string,
// nested State, or any c10::IValue).
class StateValue {
 public:
  enum class Kind { kModule, kOptimizer, kRng, kValue, kNested };

  StateValue(std::shared_ptr<torch::nn::Module> module);  // NOLINT
  template <typename M, typename = std::enable_if_t<std::is_base_of_v<torch::nn::Module, M> &&
                                                    !std::is_same_v<M, torch::nn::Module>>>
  StateValue(std::shared_ptr<M> module)  // NOLINT
      : StateValue(std::static_pointer_cast<torch::nn::Module>(std::move(module))) {}
  // A wrapped module (fabric::FabricModule, or anything whose base() gives the
  // module): its module. This layer does not know Fabric's wrappers by name.
  template <typename W, typename = std::enable_if_t<
                            std::is_convertible_v<decltype(std::declval<const W&>().base()),
                                                  std::shared_ptr<torch::nn::Module>>>>
  StateValue(const W& wrapped) : StateValue(wrapped.base()) {}  // NOLINT
  StateValue(std::shared_ptr<torch::optim::Optimizer> optimizer);  // NOLINT
  template <typename O, typename = std::enable_if_t<std::is_base_of_v<torch::optim::Optimizer, O> &&
                                                    !std::is_same_v<O, torch::optim::Optimizer>>,
            typename = void>
  StateValue(std::shared_ptr<O> optimizer)  // NOLINT
      : StateValue(std::static_pointer_cast<torch::optim::Optimizer>(std::move(optimizer))) {}
  // A wrapped optimizer (fabric::FabricOptimizer: optimizer() gives it).
  template <typename W,
            typename = std::enable_if_t<std::is_convertible_v<
                decltype(std::declval<const W&>().optimizer()), std::shared_ptr<torch::optim::Optimizer>>>,
            typename = void, typename = void>
  StateValue(const W& wrapped) : StateValue(wrapped.optimizer()) {}  // NOLINT
  StateValue(RngState rng);  // NOLINT
  StateValue(State nested);  // NOLINT
  StateValue(c10::IValue value);  // NOLINT
  StateValue(const at::Tensor& tensor) : StateValue(c10::IValue(tensor)) {}  // NOLINT
  StateValue(int value) : StateValue(c10::IValue(static_cast<int64_t>(value))) {}  // NOLINT
  StateValue(int64_t value) : StateValue(c10::IValue(value)) {}  // NOLINT
  StateValue(double value) : StateValue(c10::IValue(value)) {}  // NOLINT
  StateValue(bool value) : StateValue(c10::IValue(value)) {}  // NOLINT
  StateValue(const char* value) : StateValue(c10::IValue(std::string(value))) {}  // NOLINT
  StateValue(const std::string& value) : StateValue(c10::IValue(value)) {}  // NOLINT

  Kind kind() const { return kind_; }
  const std::shared_ptr<torch::nn::Module>& module() const { return module_; }
  const std::shared_ptr<torch::optim::Optimizer>& optimizer() const { return optimizer_; }
  const RngState& rng() const { return rng_; }
  const State& nested() const { return *nested_; }
  State& nested() { return *nested_; }
  const c10::IValue& value() const { return value_; }

  // Plain values, converted with a message naming the actual type on mismatch.
  int64_t to_int() const;
  double to_double() const;
  std::string to_string() const;
  at::Tensor to_tensor() const;

  c10::IValue to_ivalue() const;

 private:
  Kind kind_;
  std::shared_ptr<torch::nn::Module> module_;
  std::shared_ptr<torch::optim::Optimizer> optimizer_;
  RngState rng_;
  std::shared_ptr<State> nested_;
  c10::IValue value_;
};

// What load() returns: the checkpoint entries nobody asked for, and (strict=false)
// what did not match.
struct LoadResult {
  State remainder;
  std::vector<std::string> missing_keys;  // asked for, not in the file
  LoadReport mismatches;                  // per-tensor problems of modules (strict=false)
};

// The whole State as the dict written to disk.
c10::IValue state_to_ivalue(const State& state);

// Atomic write of `bytes` to `path` (see above); throws std::runtime_error naming
// the path on any failure, leaving the target untouched.
void atomic_write(const std::string& path, const std::vector<char>& bytes);
// The same, with the content produced by `produce`, which calls `sink` with
// consecutive chunks (so large checkpoints are not held in memory twice).
void atomic_write(const std::string& path,
                  const std::function<void(const std::function<void(const char*, size_t)>& sink)>&
                      produce);
// How read_checkpoint holds tensor data.
enum class ReadMode {
  kCopy,    // each tensor owns memory it was read into
  kMapped,  // tensors view a private memory map of the file: no copy at read
            // time, valid while nobody truncates the file in place (the loads
            // use it and copy whatever they hand back)
};
// Reads and unpickles a checkpoint; a missing, truncated or foreign file is a
// std::runtime_error naming the path and what is wrong with it.
c10::IValue read_checkpoint(const std::string& path, ReadMode mode = ReadMode::kCopy);

void save_checkpoint(const std::string& path, const State& state);
// Restores modules and optimizers in place, replaces plain values in `state`
// with the loaded ones. strict: a missing key or any module mismatch throws,
// listing every problem.
LoadResult load_checkpoint(const std::string& path, State& state, bool strict = true);
// The same from a checkpoint dict already read (`path` names it in errors).
LoadResult load_checkpoint_value(const c10::IValue& loaded, State& state, bool strict,
                                 const std::string& path);
// A bare state dict (Python's torch.save(model.state_dict())) into a module or optimizer.
void load_raw(const std::string& path, torch::nn::Module& module, bool strict = true);
void load_raw(const std::string& path, torch::optim::Optimizer& optimizer);

}  // namespace fabric
