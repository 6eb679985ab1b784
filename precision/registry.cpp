#include "precision/registry.h"

#include <stdexcept>

#include <c10/util/Exception.h>

#include "precision/mixed_precision.h"
#include "util/quoted_list.h"
#include "precision/true_precision.h"

namespace fabric::precision {

std::vector<std::string> valid_precisions() {
  return {"32-true", "64-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true",
          "32",      "64",      "16",       "bf16"};
}

std::string canonical_precision(const std::string& name) {
  if (name == "32" || name == "32-true") return "32-true";
  if (name == "64" || name == "64-true") return "64-true";
  if (name == "16" || name == "16-mixed") return "16-mixed";
  if (name == "bf16" || name == "bf16-mixed") return "bf16-mixed";
  if (name == "16-true") return "16-true";
  if (name == "bf16-true") return "bf16-true";
  throw std::invalid_argument(unsupported_value("precision", name, valid_precisions()));
}

std::shared_ptr<Precision> make_precision(const std::string& name, c10::DeviceType device_type) {
  const auto canonical = canonical_precision(name);
  if (canonical == "32-true") return std::make_shared<TruePrecision>(c10::ScalarType::Float);
  if (canonical == "64-true") return std::make_shared<TruePrecision>(c10::ScalarType::Double);
  if (canonical == "16-true") return std::make_shared<TruePrecision>(c10::ScalarType::Half);
  if (canonical == "bf16-true") return std::make_shared<TruePrecision>(c10::ScalarType::BFloat16);
  if (canonical == "bf16-mixed") {
    return std::make_shared<MixedPrecision>(c10::ScalarType::BFloat16, device_type);
  }
  // "16-mixed"
  if (device_type == c10::DeviceType::CPU) {
    TORCH_WARN(
        "precision='16-mixed' is not supported on the CPU (no fp16 autocast with loss "
        "scaling there); using precision='bf16-mixed' instead.");
    return std::make_shared<MixedPrecision>(c10::ScalarType::BFloat16, device_type);
  }
  return std::make_shared<MixedPrecision>(c10::ScalarType::Half, device_type,
                                          std::make_unique<GradScaler>());
}

}  // namespace fabric::precision
