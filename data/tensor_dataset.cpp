#include "data/tensor_dataset.h"

#include <stdexcept>
#include <string>

#include <ATen/ops/from_blob.h>
#include <ATen/ops/index_select.h>

namespace fabric::data {

TensorDataset::TensorDataset(at::Tensor data, at::Tensor target)
    : data_(std::move(data)), target_(std::move(target)) {
  if (data_.dim() == 0 || target_.dim() == 0 || data_.size(0) != target_.size(0)) {
    throw std::invalid_argument(
        "TensorDataset: data and target need the same first dimension, got " +
        std::to_string(data_.dim() ? data_.size(0) : 0) + " and " +
        std::to_string(target_.dim() ? target_.size(0) : 0));
  }
}

torch::data::Example<> TensorDataset::get_batch(std::vector<size_t> indices) {
  std::vector<int64_t> rows(indices.begin(), indices.end());
  for (int64_t row : rows) {
    if (row < 0 || row >= data_.size(0)) {
      throw std::out_of_range("TensorDataset: index " + std::to_string(row) +
                              " out of range for size " + std::to_string(data_.size(0)));
    }
  }
  auto index = at::from_blob(rows.data(), {static_cast<int64_t>(rows.size())}, at::kLong).clone();
  return {data_.index_select(0, index), target_.index_select(0, index)};
}

std::optional<size_t> TensorDataset::size() const { return static_cast<size_t>(data_.size(0)); }

TensorDataset TensorDataset::slice(int64_t begin, int64_t end) const {
  return {data_.slice(0, begin, end), target_.slice(0, begin, end)};
}

TensorDataset TensorDataset::select(const at::Tensor& indices) const {
  return {data_.index_select(0, indices), target_.index_select(0, indices)};
}

}  // namespace fabric::data
