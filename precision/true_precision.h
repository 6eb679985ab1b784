// "32-true", "64-true", "16-true", "bf16-true": the module is stored and run
// entirely in one dtype. Floating-point inputs are cast to it; tensors created in
// forward and during init_module default to it. Outputs of the half types are cast
// back to float32 (as Lightning does, so losses are reduced in float32); "64-true"
// keeps float64 outputs, since casting them down would discard what was asked for.
#pragma once

#include "precision/precision.h"

namespace fabric::precision {

class TruePrecision : public Precision {
 public:
  // dtype: Float, Double, Half or BFloat16.
  explicit TruePrecision(c10::ScalarType dtype);

  std::string name() const override;
  c10::ScalarType param_dtype() const override { return dtype_; }
  ScopePtr module_init_context() const override;
  ScopePtr forward_context() const override;
  at::Tensor convert_input(const at::Tensor& input) const override;
  at::Tensor convert_output(const at::Tensor& output) const override;

 private:
  c10::ScalarType dtype_;
};

}  // namespace fabric::precision
