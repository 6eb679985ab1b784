// Sharding units: blocks of a model that a sharding strategy (fsdp) gathers and
// frees one at a time. LibTorch modules have no forward hooks, so a unit's
// forward goes through run_sharding_unit (fabric::Sharded<Impl> and the
// auto-wrap adapters call it); with no strategy watching the module it is a
// plain call, so the same model runs under every strategy.
//
// Two process-wide registries keyed by module address:
//  - marks: modules a user opted in (fabric::Sharded, fabric::shard); a strategy
//    reads them at setup. A mark dies with its module.
//  - runners: the strategy that set a unit up, for the unit's forward. An entry
//    holds only while that very module lives (a new module at a dead one's
//    address is not set up).
#pragma once

#include <memory>
#include <type_traits>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>

namespace torch::nn {
class Module;
}

namespace fabric::strategies {

// What a strategy does around one call of a unit's forward.
class UnitRunner {
 public:
  virtual ~UnitRunner() = default;
  // Before the forward: gather the unit's parameters.
  virtual void pre_forward(torch::nn::Module& unit) = 0;
  // After it, given the tensors it returned: arrange the backward (pre-backward
  // hooks on outputs that require grad) and free what is no longer needed.
  virtual void post_forward(torch::nn::Module& unit, const std::vector<at::Tensor>& outputs) = 0;
  // The forward threw: undo pre_forward.
  virtual void forward_failed(torch::nn::Module& unit) = 0;
  // Each tensor argument of the forward passes through here before the call
  // (between pre_forward and the forward): the strategy may return an identity
  // of it whose backward tells it the unit's backward is done (the gradient
  // with respect to the unit's inputs exists, so every gradient of its
  // parameters has been accumulated), as FSDP2 does.
  virtual at::Tensor mark_input(torch::nn::Module& unit, const at::Tensor& input) {
    (void)unit;
    return input;
  }
};

void mark_sharding_unit(const std::shared_ptr<torch::nn::Module>& module);
bool is_marked_sharding_unit(const torch::nn::Module& module);

// runner == nullptr removes the entry.
void set_unit_runner(const torch::nn::Module& module, UnitRunner* runner);
UnitRunner* unit_runner(const torch::nn::Module& module);

namespace detail {
template <typename T, typename = void>
struct is_tuple_like : std::false_type {};
template <typename T>
struct is_tuple_like<T, std::void_t<decltype(std::tuple_size<T>::value)>> : std::true_type {};

// The tensors in a forward's result: a tensor, a vector of tensors, or tuples
// of them. Anything else carries no tensors the strategy can hook: the unit then
// stays gathered until its gradients are reduced.
template <typename T>
void collect_tensors(const T& value, std::vector<at::Tensor>& out) {
  if constexpr (std::is_same_v<T, at::Tensor>) {
    out.push_back(value);
  } else if constexpr (std::is_same_v<T, std::vector<at::Tensor>>) {
    out.insert(out.end(), value.begin(), value.end());
  } else if constexpr (is_tuple_like<T>::value) {
    std::apply([&out](const auto&... items) { (collect_tensors(items, out), ...); }, value);
  }
}
template <typename T>
std::vector<at::Tensor> tensors_of(const T& value) {
  std::vector<at::Tensor> out;
  collect_tensors(value, out);
  return out;
}

template <typename T>
decltype(auto) mark_input(UnitRunner& runner, torch::nn::Module& unit, T&& arg) {
  using Plain = std::decay_t<T>;
  if constexpr (std::is_same_v<Plain, at::Tensor>) {
    return runner.mark_input(unit, arg);
  } else if constexpr (std::is_same_v<Plain, std::vector<at::Tensor>>) {
    std::vector<at::Tensor> out;
    out.reserve(arg.size());
    for (const auto& t : arg) out.push_back(runner.mark_input(unit, t));
    return out;
  } else {
    return std::forward<T>(arg);
  }
}
}  // namespace detail

// Runs `forward(args...)` (a callable returning the unit's output) as one call
// of `unit`; tensor arguments (and vectors of them) pass through the runner's
// mark_input first, unless `forward` takes one as a non-const reference.
template <typename Forward, typename... Args>
auto run_sharding_unit(torch::nn::Module& unit, Forward&& forward, Args&&... args) {
  UnitRunner* runner = unit_runner(unit);
  if (!runner) return forward(std::forward<Args>(args)...);
  runner->pre_forward(unit);
  try {
    auto output = [&]() {
      if constexpr (std::is_invocable_v<Forward&, decltype(detail::mark_input(
                                                      *runner, unit, std::forward<Args>(args)))...>) {
        return forward(detail::mark_input(*runner, unit, std::forward<Args>(args))...);
      } else {
        return forward(std::forward<Args>(args)...);
      }
    }();
    runner->post_forward(unit, detail::tensors_of(output));
    return output;
  } catch (...) {
    runner->forward_failed(unit);
    throw;
  }
}

}  // namespace fabric::strategies
