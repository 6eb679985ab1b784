// "'a', 'b', 'c'": how option values are listed in error messages (precision,
// strategies).
#pragma once

#include <string>
#include <vector>

namespace fabric {

inline std::string quoted_list(const std::vector<std::string>& items) {
  std::string out;
  for (const auto& item : items) out += (out.empty() ? "" : ", ") + ("'" + item + "'");
  return out;
}

}  // namespace fabric
