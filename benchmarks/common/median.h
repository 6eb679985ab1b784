// The median of a benchmark's repeated measurements (the mean of the middle two
// for an even count): every benchmark compares medians, so noise hits both sides alike.
#pragma once

#include <algorithm>
#include <stdexcept>
#include <vector>

namespace benchmarks {

inline double median(std::vector<double> values) {
  if (values.empty()) throw std::invalid_argument("median of no values");
  std::sort(values.begin(), values.end());
  const size_t n = values.size();
  return n % 2 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

}  // namespace benchmarks
