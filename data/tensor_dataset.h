// A dataset over in-memory tensors (Python's TensorDataset): example i is
// {data[i], target[i]}. It hands out whole batches with one index_select instead of
// stacking single examples, which keeps the loader cheap for small models.
#pragma once

#include <cstddef>
#include <optional>
#include <vector>

#include <torch/data/datasets/base.h>
#include <torch/data/example.h>

namespace fabric::data {

class TensorDataset
    : public torch::data::datasets::BatchDataset<TensorDataset, torch::data::Example<>,
                                                 std::vector<size_t>> {
 public:
  // data and target must have the same first dimension.
  TensorDataset(at::Tensor data, at::Tensor target);

  torch::data::Example<> get_batch(std::vector<size_t> indices) override;
  std::optional<size_t> size() const override;

  const at::Tensor& data() const { return data_; }
  const at::Tensor& target() const { return target_; }
  // Rows [begin, end) as a new dataset sharing storage.
  TensorDataset slice(int64_t begin, int64_t end) const;
  // Rows in `indices` order (e.g. a seeded permutation for a train/validation split).
  TensorDataset select(const at::Tensor& indices) const;

 private:
  at::Tensor data_;
  at::Tensor target_;
};

}  // namespace fabric::data
