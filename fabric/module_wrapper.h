// FabricModule<M>: what Fabric::setup returns for a module. Calling it runs M's
// forward inside the precision's forward context (autocast, default dtype), with
// tensor arguments converted on the way in and tensor results on the way out, so
// a training loop written for M works unchanged. `->` reaches M's own members and
// module() returns the original object (already moved to the device).
#pragma once

#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

#include "precision/precision.h"
#include "strategies/strategy.h"

namespace torch::nn {
class Module;
}

namespace fabric {

template <typename M>
class FabricModule {
 public:
  FabricModule(std::shared_ptr<M> module, std::shared_ptr<precision::Precision> precision,
               std::shared_ptr<strategies::Strategy> strategy)
      : module_(std::move(module)),
        precision_(std::move(precision)),
        strategy_(std::move(strategy)) {}

  template <typename... Args>
  auto operator()(Args&&... args) {
    auto strategy_scope = strategy_->forward_context(*module_);
    auto scope = precision_->forward_context();
    return convert_output(module_->forward(convert_input(std::forward<Args>(args))...));
  }
  template <typename... Args>
  auto forward(Args&&... args) {
    return (*this)(std::forward<Args>(args)...);
  }

  // The wrapped module.
  const std::shared_ptr<M>& module() const { return module_; }
  M* operator->() const { return module_.get(); }
  M& operator*() const { return *module_; }
  // The wrapped module as the LibTorch base class (for saving, parameters, ...).
  std::shared_ptr<torch::nn::Module> base() const { return module_; }

 private:
  template <typename T>
  decltype(auto) convert_input(T&& value) const {
    if constexpr (std::is_same_v<std::decay_t<T>, at::Tensor>) {
      return precision_->convert_input(value);
    } else {
      return std::forward<T>(value);
    }
  }

  template <typename T>
  T convert_output(T value) const {
    if constexpr (std::is_same_v<T, at::Tensor>) {
      return precision_->convert_output(value);
    } else if constexpr (std::is_same_v<T, std::vector<at::Tensor>>) {
      for (auto& t : value) t = precision_->convert_output(t);
      return value;
    } else if constexpr (is_tuple<T>::value) {
      std::apply([this](auto&... items) { ((items = convert_output(std::move(items))), ...); },
                 value);
      return value;
    } else {
      return value;
    }
  }

  template <typename T>
  struct is_tuple : std::false_type {};
  template <typename... Ts>
  struct is_tuple<std::tuple<Ts...>> : std::true_type {};

  std::shared_ptr<M> module_;
  std::shared_ptr<precision::Precision> precision_;
  std::shared_ptr<strategies::Strategy> strategy_;
};

}  // namespace fabric
