#include "fabric/sampler.h"

#include <stdexcept>
#include <string>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/ops/randperm.h>
#include <torch/serialize/archive.h>

namespace fabric {

DistributedSampler::DistributedSampler(size_t dataset_size, SamplerOptions options)
    : size_(dataset_size), options_(options), epoch_(std::make_shared<int64_t>(0)) {
  if (options_.num_replicas < 1) {
    throw std::invalid_argument("DistributedSampler: num_replicas must be >= 1, got " +
                                std::to_string(options_.num_replicas));
  }
  if (options_.rank < 0 || options_.rank >= options_.num_replicas) {
    throw std::invalid_argument("DistributedSampler: rank " + std::to_string(options_.rank) +
                                " is out of range for num_replicas " +
                                std::to_string(options_.num_replicas));
  }
  compute_sizes();
  reset();
}

void DistributedSampler::compute_sizes() {
  const auto n = static_cast<int64_t>(size_);
  const int64_t r = options_.num_replicas;
  if (options_.drop_last && n % r != 0) {
    num_samples_ = static_cast<size_t>((n - r + r - 1) / r);  // ceil((n - r) / r)
    if (n < r) num_samples_ = 0;
  } else {
    num_samples_ = static_cast<size_t>((n + r - 1) / r);
  }
}

std::vector<size_t> DistributedSampler::indices() const {
  std::vector<size_t> all(size_);
  if (options_.shuffle) {
    auto generator = at::make_generator<at::CPUGeneratorImpl>(options_.seed + *epoch_);
    auto perm = at::randperm(static_cast<int64_t>(size_), generator, at::kLong);
    const int64_t* p = perm.data_ptr<int64_t>();
    for (size_t i = 0; i < size_; ++i) all[i] = static_cast<size_t>(p[i]);
  } else {
    for (size_t i = 0; i < size_; ++i) all[i] = i;
  }
  const size_t total = num_samples_ * static_cast<size_t>(options_.num_replicas);
  if (total > all.size() && !all.empty()) {
    const size_t original = all.size();
    for (size_t i = 0; all.size() < total; ++i) all.push_back(all[i % original]);
  } else {
    all.resize(total);
  }
  std::vector<size_t> mine;
  mine.reserve(num_samples_);
  for (size_t i = static_cast<size_t>(options_.rank); i < total;
       i += static_cast<size_t>(options_.num_replicas)) {
    mine.push_back(all[i]);
  }
  return mine;
}

void DistributedSampler::reset(std::optional<size_t> new_size) {
  if (new_size) {
    size_ = *new_size;
    compute_sizes();
  }
  current_ = indices();
  position_ = 0;
}

std::optional<std::vector<size_t>> DistributedSampler::next(size_t batch_size) {
  if (position_ >= current_.size()) return std::nullopt;
  const size_t end = std::min(current_.size(), position_ + batch_size);
  std::vector<size_t> batch(current_.begin() + position_, current_.begin() + end);
  position_ = end;
  return batch;
}

void DistributedSampler::save(torch::serialize::OutputArchive& archive) const {
  archive.write("epoch", at::tensor(*epoch_), /*is_buffer=*/true);
  archive.write("position", at::tensor(static_cast<int64_t>(position_)), /*is_buffer=*/true);
}

void DistributedSampler::load(torch::serialize::InputArchive& archive) {
  at::Tensor epoch, position;
  archive.read("epoch", epoch, /*is_buffer=*/true);
  archive.read("position", position, /*is_buffer=*/true);
  *epoch_ = epoch.item<int64_t>();
  current_ = indices();
  position_ = static_cast<size_t>(position.item<int64_t>());
}

}  // namespace fabric
