// Turns a precision name into a plugin. Adding a precision = one plugin file plus
// one entry in registry.cpp.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <c10/core/DeviceType.h>

#include "precision/precision.h"

namespace fabric::precision {

// Canonical names followed by the accepted aliases, for error messages.
std::vector<std::string> valid_precisions();
// "32" -> "32-true", "16" -> "16-mixed", "bf16" -> "bf16-mixed", ...; throws
// std::invalid_argument naming the bad value and the valid ones.
std::string canonical_precision(const std::string& name);
// Builds the plugin for `device_type`. "16-mixed" on a CPU falls back to
// "bf16-mixed" with a warning (LibTorch has no fp16 GradScaler path worth using
// on CPUs, and Lightning does the same); on CUDA it comes with a GradScaler.
std::shared_ptr<Precision> make_precision(const std::string& name, c10::DeviceType device_type);

}  // namespace fabric::precision
