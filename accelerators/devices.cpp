#include "accelerators/devices.h"

#include <cctype>
#include <stdexcept>

namespace fabric {
namespace {

bool parse_int(const std::string& text, int& value) {
  if (text.empty()) return false;
  size_t i = (text[0] == '-') ? 1 : 0;
  if (i == text.size()) return false;
  for (size_t j = i; j < text.size(); ++j) {
    if (!std::isdigit(static_cast<unsigned char>(text[j]))) return false;
  }
  try {
    value = std::stoi(text);
  } catch (const std::out_of_range&) {
    return false;
  }
  return true;
}

// A list of device indices must name each device once: two ranks on one GPU is
// something NCCL refuses at the first collective (Lightning rejects it too).
void check_distinct(const std::vector<int>& indices) {
  for (size_t i = 0; i < indices.size(); ++i) {
    for (size_t j = 0; j < i; ++j) {
      if (indices[i] == indices[j]) {
        std::string list;
        for (size_t k = 0; k < indices.size(); ++k) list += (k ? "," : "") + std::to_string(indices[k]);
        throw std::invalid_argument("devices='" + list + "' names device " +
                                    std::to_string(indices[i]) +
                                    " more than once; each rank needs a device of its own: "
                                    "list distinct indices (e.g. '0,1') or give a count");
      }
    }
    if (indices[i] < 0) {
      throw std::invalid_argument("devices: index " + std::to_string(indices[i]) +
                                  " is not valid; device indices are >= 0");
    }
  }
}

std::string trim(const std::string& text) {
  size_t begin = text.find_first_not_of(" \t[]");
  size_t end = text.find_last_not_of(" \t[]");
  return begin == std::string::npos ? "" : text.substr(begin, end - begin + 1);
}

}  // namespace

Devices::Devices(int count) : kind_(Kind::kCount), count_(count) {}

Devices::Devices(const char* spec) : Devices(std::string(spec)) {}

Devices::Devices(const std::string& spec) {
  const std::string text = trim(spec);
  if (text == "auto") return;
  int value = 0;
  if (text.find(',') == std::string::npos && parse_int(text, value)) {
    kind_ = Kind::kCount;
    count_ = value;
    return;
  }
  // A list of indices: "0,1" or "[0, 1]".
  std::vector<int> indices;
  size_t start = 0;
  bool ok = !text.empty();
  while (ok && start <= text.size()) {
    size_t comma = text.find(',', start);
    std::string item = trim(text.substr(start, comma == std::string::npos ? std::string::npos
                                                                          : comma - start));
    if (item.empty() && comma == std::string::npos && !indices.empty()) break;  // "1,"
    ok = parse_int(item, value) && value >= 0;
    if (ok) indices.push_back(value);
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  if (!ok || indices.empty()) {
    throw std::invalid_argument(
        "devices='" + spec +
        "' is not valid. Valid values: 'auto', a count (1, 2, ..., or -1 for all visible "
        "devices), or a list of device indices such as '0,1'");
  }
  check_distinct(indices);
  kind_ = Kind::kList;
  indices_ = std::move(indices);
}

Devices::Devices(std::vector<int> indices) : kind_(Kind::kList), indices_(std::move(indices)) {
  check_distinct(indices_);
}

Devices::Devices(std::initializer_list<int> indices)
    : Devices(std::vector<int>(indices)) {}

std::string Devices::str() const {
  switch (kind_) {
    case Kind::kAuto: return "auto";
    case Kind::kCount: return std::to_string(count_);
    case Kind::kList: {
      std::string out = "[";
      for (size_t i = 0; i < indices_.size(); ++i) {
        out += (i ? ", " : "") + std::to_string(indices_[i]);
      }
      return out + "]";
    }
  }
  return "auto";
}

}  // namespace fabric
