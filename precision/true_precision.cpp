#include "precision/true_precision.h"

#include <stdexcept>

#include "precision/scopes.h"

namespace fabric::precision {

TruePrecision::TruePrecision(c10::ScalarType dtype) : dtype_(dtype) {
  using c10::ScalarType;
  if (dtype != ScalarType::Float && dtype != ScalarType::Double && dtype != ScalarType::Half &&
      dtype != ScalarType::BFloat16) {
    throw std::invalid_argument(std::string("TruePrecision: unsupported dtype ") +
                                c10::toString(dtype) +
                                "; valid dtypes are Float, Double, Half, BFloat16");
  }
}

std::string TruePrecision::name() const {
  switch (dtype_) {
    case c10::ScalarType::Double: return "64-true";
    case c10::ScalarType::Half: return "16-true";
    case c10::ScalarType::BFloat16: return "bf16-true";
    default: return "32-true";
  }
}

ScopePtr TruePrecision::module_init_context() const {
  if (dtype_ == c10::ScalarType::Float) return nullptr;
  return std::make_unique<DefaultDtypeScope>(dtype_);
}

ScopePtr TruePrecision::forward_context() const {
  if (dtype_ == c10::ScalarType::Float) return nullptr;
  return std::make_unique<DefaultDtypeScope>(dtype_);
}

at::Tensor TruePrecision::convert_input(const at::Tensor& input) const {
  return cast_if_floating(input, dtype_);
}

at::Tensor TruePrecision::convert_output(const at::Tensor& output) const {
  if (dtype_ == c10::ScalarType::Half || dtype_ == c10::ScalarType::BFloat16) {
    return cast_if_floating(output, c10::ScalarType::Float);
  }
  return output;
}

}  // namespace fabric::precision
