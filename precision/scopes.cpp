#include "precision/scopes.h"

#include <ATen/autocast_mode.h>
#include <c10/core/DefaultDtype.h>

namespace fabric::precision {

AutocastScope::AutocastScope(c10::DeviceType device_type, c10::ScalarType dtype, bool enabled)
    : device_type_(device_type),
      prev_enabled_(at::autocast::is_autocast_enabled(device_type)),
      prev_dtype_(at::autocast::get_autocast_dtype(device_type)),
      prev_cache_enabled_(at::autocast::is_autocast_cache_enabled()) {
  at::autocast::set_autocast_enabled(device_type_, enabled);
  at::autocast::set_autocast_dtype(device_type_, dtype);
  at::autocast::increment_nesting();
  at::autocast::set_autocast_cache_enabled(true);
}

AutocastScope::~AutocastScope() {
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  at::autocast::set_autocast_enabled(device_type_, prev_enabled_);
  at::autocast::set_autocast_dtype(device_type_, prev_dtype_);
  at::autocast::set_autocast_cache_enabled(prev_cache_enabled_);
}

DefaultDtypeScope::DefaultDtypeScope(c10::ScalarType dtype)
    : previous_(c10::get_default_dtype_as_scalartype()) {
  c10::set_default_dtype(c10::scalarTypeToTypeMeta(dtype));
}

DefaultDtypeScope::~DefaultDtypeScope() {
  c10::set_default_dtype(c10::scalarTypeToTypeMeta(previous_));
}

}  // namespace fabric::precision
