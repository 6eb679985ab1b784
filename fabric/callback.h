// Callbacks: user objects Fabric calls at named points of the user's own loop
// (Lightning's `fabric.call("on_train_epoch_end", ...)`). A callback handles the
// hook names it knows and ignores the rest.
#pragma once

#include <string>

namespace fabric {

class Fabric;

class Callback {
 public:
  virtual ~Callback() = default;
  // Called by Fabric::call(hook) on every rank.
  virtual void on(const std::string& hook, Fabric& fabric) = 0;
};

}  // namespace fabric
