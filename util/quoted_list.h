// "'a', 'b', 'c'": how option values are listed in error messages (precision,
// strategies), and the one message for an option value that is not one of them.
#pragma once

#include <string>
#include <vector>

namespace fabric {

inline std::string quoted_list(const std::vector<std::string>& items) {
  std::string out;
  for (const auto& item : items) out += (out.empty() ? "" : ", ") + ("'" + item + "'");
  return out;
}

// "strategy='x' is not supported. Valid values: 'auto', 'ddp'"
inline std::string unsupported_value(const std::string& option, const std::string& value,
                                     const std::vector<std::string>& valid) {
  return option + "='" + value + "' is not supported. Valid values: " + quoted_list(valid);
}

}  // namespace fabric
