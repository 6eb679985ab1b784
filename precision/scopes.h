// RAII scopes used by the precision plugins and exposed for users who need them
// outside a set-up module (Fabric::autocast returns one).
#pragma once

#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>

#include "precision/precision.h"

namespace fabric::precision {

// LibTorch's autocast for one device type, entered and left as Python's
// `torch.autocast` does: the previous state is restored on exit and the cast cache
// is cleared when the outermost autocast scope ends.
class AutocastScope : public Scope {
 public:
  AutocastScope(c10::DeviceType device_type, c10::ScalarType dtype, bool enabled = true);
  ~AutocastScope() override;
  AutocastScope(const AutocastScope&) = delete;
  AutocastScope& operator=(const AutocastScope&) = delete;

 private:
  c10::DeviceType device_type_;
  bool prev_enabled_;
  c10::ScalarType prev_dtype_;
  bool prev_cache_enabled_;
};

// Sets the default floating-point dtype (what torch::empty/torch::nn layers create)
// and restores the previous one on exit.
class DefaultDtypeScope : public Scope {
 public:
  explicit DefaultDtypeScope(c10::ScalarType dtype);
  ~DefaultDtypeScope() override;
  DefaultDtypeScope(const DefaultDtypeScope&) = delete;
  DefaultDtypeScope& operator=(const DefaultDtypeScope&) = delete;

 private:
  c10::ScalarType previous_;
};

}  // namespace fabric::precision
