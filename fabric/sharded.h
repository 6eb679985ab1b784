// fabric::Sharded<Impl>: marks a block of the model as its own sharding unit
// under strategy="fsdp", so only one block's full parameters exist at a time
// (plus the root: whatever is in no unit). It is a torch::nn::ModuleHolder, so
// registering it keeps parameter names (`h.0.attn.weight`), and under every
// other strategy calling it is a plain forward: one model definition serves
// single_device, ddp and fsdp.
//
//   struct GptImpl : torch::nn::Module {
//     std::vector<fabric::Sharded<BlockImpl>> blocks;
//     GptImpl() { for (int i = 0; i < 4; ++i)
//       blocks.push_back(register_module("h" + std::to_string(i), fabric::Sharded<BlockImpl>(cfg))); }
//     torch::Tensor forward(torch::Tensor x) { for (auto& b : blocks) x = b(x); return x; }
//   };
//
// Call the unit as `block(x)`: `block->forward(x)` bypasses the strategy, and
// under fsdp the block's parameters are shards between steps, so it fails.
// Children of a torch::nn::Sequential can be made units without changing the
// model: FSDPOptions::auto_wrap_policy (strategies/auto_wrap.h).
#pragma once

#include <memory>
#include <type_traits>
#include <utility>

#include <torch/nn/pimpl.h>

#include "strategies/sharding_unit.h"

namespace fabric {

template <typename Impl>
class Sharded : public torch::nn::ModuleHolder<Impl> {
  using Base = torch::nn::ModuleHolder<Impl>;

 public:
  // An empty holder (assign it later).
  Sharded(std::nullptr_t) : Base(nullptr) {}
  // Shares an existing module.
  Sharded(std::shared_ptr<Impl> module) : Base(std::move(module)) { mark(); }
  // Builds Impl from these constructor arguments.
  template <typename Head, typename... Tail,
            typename = std::enable_if_t<!std::is_same_v<std::decay_t<Head>, Sharded> &&
                                        !std::is_same_v<std::decay_t<Head>, std::nullptr_t> &&
                                        !std::is_same_v<std::decay_t<Head>, std::shared_ptr<Impl>>>>
  explicit Sharded(Head&& head, Tail&&... tail)
      : Base(std::forward<Head>(head), std::forward<Tail>(tail)...) {
    mark();
  }

  // The unit's forward, as the strategy sees it.
  template <typename... Args>
  auto operator()(Args&&... args) {
    Impl& impl = *this->get();
    return strategies::run_sharding_unit(
        impl,
        [&impl](auto&&... in) -> decltype(impl.forward(std::forward<decltype(in)>(in)...)) {
          return impl.forward(std::forward<decltype(in)>(in)...);
        },
        std::forward<Args>(args)...);
  }

 private:
  void mark() {
    if (!this->is_empty()) strategies::mark_sharding_unit(this->ptr());
  }
};

}  // namespace fabric
