// Which devices a Fabric uses: the `devices` option as Lightning spells it.
#pragma once

#include <initializer_list>
#include <string>
#include <vector>

namespace fabric {

// `devices`: a count ("2", 2, -1 for all), a list of indices ({0, 1}, "0,1"), or
// "auto". Implicit constructors let the option be written as in Python.
class Devices {
 public:
  enum class Kind { kAuto, kCount, kList };

  Devices() = default;  // "auto"
  Devices(int count);   // NOLINT(google-explicit-constructor)
  Devices(const char* spec);         // NOLINT
  Devices(const std::string& spec);  // NOLINT
  Devices(std::vector<int> indices);  // NOLINT
  Devices(std::initializer_list<int> indices);  // NOLINT

  Kind kind() const { return kind_; }
  int count() const { return count_; }  // kCount only; -1 means "all"
  const std::vector<int>& indices() const { return indices_; }  // kList only
  // The spelling used in messages and to compare with LT_DEVICES: "auto", "2", "[0, 1]".
  std::string str() const;

 private:
  Kind kind_ = Kind::kAuto;
  int count_ = 0;
  std::vector<int> indices_;
};

}  // namespace fabric
