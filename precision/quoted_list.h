// "'a', 'b', 'c'": how option values are listed in error messages. Lives in the
// lowest layer (precision) so strategies and fabric can share it.
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
