// The loader returned by Fabric::setup_dataloader: LibTorch's data loader over a
// DistributedSampler, whose batches arrive on the Fabric's device. Every new pass
// (begin()) advances the sampler's epoch, as Lightning's loader wrapper does, so
// each epoch is shuffled differently and reproducibly; set_epoch() overrides it
// (e.g. when resuming).
//
// Works with any torch::data dataset whose examples are torch::data::Example<>:
// per-example datasets (Dataset<Self>) are stacked with transforms::Stack<>;
// datasets that return whole Example<> batches (fabric::data::TensorDataset) are
// used as they are.
#pragma once

#include <memory>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include <torch/data/dataloader.h>
#include <torch/data/datasets/map.h>
#include <torch/data/transforms/stack.h>

#include "fabric/sampler.h"

namespace fabric {

struct DataLoaderOptions {
  int64_t batch_size = 1;
  bool shuffle = false;
  // Drop the last incomplete batch of each epoch.
  bool drop_last = false;
  // LibTorch worker threads (0 = load in the training thread).
  int64_t num_workers = 0;
  // Shuffle seed; default: the seed given to Fabric::seed_everything, else 0.
  std::optional<uint64_t> seed;
  // Move each batch to the Fabric's device.
  bool move_to_device = true;
  // Copy batches for a CUDA device through page-locked (pinned) memory, without
  // blocking the host (the copy overlaps with queued kernels). Default: on when
  // batches go to a CUDA device; ignored for other devices.
  std::optional<bool> pin_memory;
};

namespace detail {

template <typename Dataset>
auto as_batch_dataset(Dataset dataset) {
  using Batch = typename Dataset::BatchType;
  if constexpr (std::is_same_v<Batch, std::vector<torch::data::Example<>>>) {
    return dataset.map(torch::data::transforms::Stack<>());
  } else {
    static_assert(std::is_same_v<Batch, torch::data::Example<>>,
                  "setup_dataloader needs a dataset of torch::data::Example<> (per example or "
                  "per batch)");
    return dataset;
  }
}

}  // namespace detail

template <typename Dataset>
class FabricDataLoader {
  using Batched = decltype(detail::as_batch_dataset(std::declval<Dataset>()));
  using Loader = torch::data::StatelessDataLoader<Batched, DistributedSampler>;
  using Inner = torch::data::Iterator<torch::data::Example<>>;

 public:
  class iterator {
   public:
    using value_type = torch::data::Example<>;
    iterator(Inner inner, std::optional<c10::Device> device, bool pin)
        : inner_(std::move(inner)), device_(device), pin_(pin) {}
    value_type& operator*() {
      if (!current_) {
        auto& batch = *inner_;
        current_ = device_ ? value_type{move(batch.data), move(batch.target)} : batch;
      }
      return *current_;
    }
    value_type* operator->() { return &**this; }
    iterator& operator++() {
      ++inner_;
      current_.reset();
      return *this;
    }
    bool operator==(const iterator& other) const { return inner_ == other.inner_; }
    bool operator!=(const iterator& other) const { return !(*this == other); }

   private:
    at::Tensor move(const at::Tensor& t) const {
      if (!t.defined() || t.device() == *device_) return t;  // no copy when already there
      if (pin_ && t.is_cpu()) return t.pin_memory().to(*device_, /*non_blocking=*/true);
      return t.to(*device_);
    }

    Inner inner_;
    std::optional<c10::Device> device_;
    bool pin_ = false;
    std::optional<value_type> current_;
  };

  FabricDataLoader(Dataset dataset, const DataLoaderOptions& options, SamplerOptions sampler,
                   std::optional<c10::Device> device)
      : device_(device),
        pin_(device && device->is_cuda() && options.pin_memory.value_or(true)) {
    auto batched = detail::as_batch_dataset(std::move(dataset));
    const auto size = batched.size();
    if (!size) throw std::invalid_argument("setup_dataloader: the dataset has no size()");
    if (options.batch_size < 1) {
      throw std::invalid_argument("setup_dataloader: batch_size must be >= 1, got " +
                                  std::to_string(options.batch_size));
    }
    batch_size_ = options.batch_size;
    drop_last_ = options.drop_last;
    sampler_ = std::make_shared<DistributedSampler>(*size, sampler);
    auto loader_options = torch::data::DataLoaderOptions()
                              .batch_size(static_cast<size_t>(options.batch_size))
                              .drop_last(options.drop_last)
                              .workers(static_cast<size_t>(options.num_workers));
    // The loader owns a copy of the sampler; the copies share the epoch.
    loader_ = std::make_unique<Loader>(std::move(batched), *sampler_, loader_options);
  }

  // Starts a new pass; the first pass is epoch 0, the next epoch 1, ...
  iterator begin() {
    if (!epoch_override_) sampler_->set_epoch(passes_);
    epoch_override_ = false;
    ++passes_;
    return iterator(loader_->begin(), device_, pin_);
  }
  iterator end() { return iterator(loader_->end(), device_, pin_); }

  // The next begin() uses this epoch's order; later passes continue from it.
  void set_epoch(int64_t epoch) {
    sampler_->set_epoch(epoch);
    passes_ = epoch;
    epoch_override_ = true;
  }
  // Whether batches are copied through pinned memory (pin_memory, resolved).
  bool pins_memory() const { return pin_; }
  // Batches per pass on this rank.
  size_t size() const {
    const size_t n = sampler_->num_samples();
    const size_t b = static_cast<size_t>(batch_size_);
    return drop_last_ ? n / b : (n + b - 1) / b;
  }
  const DistributedSampler& sampler() const { return *sampler_; }

 private:
  std::optional<c10::Device> device_;
  bool pin_ = false;
  std::shared_ptr<DistributedSampler> sampler_;
  std::unique_ptr<Loader> loader_;
  int64_t passes_ = 0;
  bool epoch_override_ = false;
  int64_t batch_size_ = 1;
  bool drop_last_ = false;
};

}  // namespace fabric
