// The sampler behind Fabric's data loaders: PyTorch's DistributedSampler order.
// With shuffle, epoch e visits randperm(size) drawn from a CPU generator seeded
// with seed + e, so the order depends only on (seed, epoch), never on the global
// RNG: a resumed run sees the same batches. Each of `num_replicas` ranks takes
// every num_replicas-th index starting at `rank`, after padding the list with its
// own head to a multiple of num_replicas (or cutting the tail when drop_last).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include <torch/data/samplers/base.h>

namespace fabric {

struct SamplerOptions {
  int64_t num_replicas = 1;
  int64_t rank = 0;
  bool shuffle = true;
  uint64_t seed = 0;
  bool drop_last = false;
};

class DistributedSampler : public torch::data::samplers::Sampler<> {
 public:
  DistributedSampler(size_t dataset_size, SamplerOptions options = {});

  // Chooses the epoch whose order the next reset() produces. Copies of a sampler
  // (the data loader keeps one) share the epoch.
  void set_epoch(int64_t epoch) { *epoch_ = epoch; }
  int64_t epoch() const { return *epoch_; }
  // The indices this rank visits in the current epoch, in order.
  std::vector<size_t> indices() const;
  // Number of indices per rank per epoch.
  size_t num_samples() const { return num_samples_; }

  void reset(std::optional<size_t> new_size = std::nullopt) override;
  std::optional<std::vector<size_t>> next(size_t batch_size) override;
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;

 private:
  void compute_sizes();

  size_t size_;
  SamplerOptions options_;
  size_t num_samples_ = 0;
  std::shared_ptr<int64_t> epoch_;
  std::vector<size_t> current_;
  size_t position_ = 0;
};

}  // namespace fabric
