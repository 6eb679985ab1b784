// Which module a strategy set up. A raw address is not an identity: a sweep
// loop that reuses one Fabric destroys a model and builds the next, and the
// allocator often puts it where the old one lived; a strategy that compared
// addresses would take the new model for the old one and skip its set-up (no
// broadcast, no hooks, replicas drift). The identity also holds a weak
// reference: the same address counts only while that very module is alive.
// Modules not owned by a std::shared_ptr (a module on the stack) can only be
// told apart by address.
#pragma once

#include <memory>

#include <torch/nn/module.h>

namespace fabric::strategies {

class ModuleIdentity {
 public:
  ModuleIdentity() = default;
  explicit ModuleIdentity(const torch::nn::Module& module)
      : address_(&module), owner_(module.weak_from_this()), owned_(!owner_.expired()) {}

  // True for the module this identity was made from, while it lives.
  bool is(const torch::nn::Module& module) const {
    if (address_ != &module) return false;
    if (!owned_) return true;
    const auto alive = owner_.lock();
    return alive && alive.get() == &module;
  }
  // The module is gone: what was set up for it can be dropped.
  bool expired() const { return owned_ && owner_.expired(); }

 private:
  const torch::nn::Module* address_ = nullptr;
  std::weak_ptr<const torch::nn::Module> owner_;
  bool owned_ = false;
};

}  // namespace fabric::strategies
