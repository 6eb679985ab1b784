// fabric::tp: layers whose weights are split across the ranks of a
// tensor-parallel group (Megatron-LM's tensor parallelism), each with its
// collectives as autograd functions, for use under strategy="model_parallel".
//
// A split layer is built from the whole layer (a torch::nn::Linear or
// Embedding initialised as usual, from the same seed on every rank) and keeps
// this rank's slice, so the split model starts where the unsplit one does and,
// under fabric.save, is gathered back into the unsplit model's state dict
// (same names, same shapes). With a group of one (any other strategy) every
// layer is whole and computes exactly what the plain layer does, so one model
// definition serves every strategy.
//
// The pattern, as in Megatron: a ColumnParallelLinear (weight split by output
// rows: each rank computes its part of the outputs) followed by a
// RowParallelLinear with input_is_parallel (split by input columns: each rank
// multiplies its part of the inputs, and one all-reduce sums the parts) is one
// all-reduce in forward and one in backward, whatever runs in between on each
// rank's part (gelu, attention over this rank's heads).
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/nn/module.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

namespace fabric::strategies {
class Strategy;
}

namespace fabric::tp {

// This rank's tensor-parallel group. Size 1 (no collectives) unless the
// strategy is model_parallel with tensor_parallel_size > 1.
struct Group {
  c10::intrusive_ptr<c10d::Backend> backend;  // null for a group of one
  int64_t rank = 0;
  int64_t size = 1;
};
// The strategy's tensor-parallel group (after fabric.launch()); a group of one
// for every strategy but model_parallel.
Group tensor_parallel_group(const strategies::Strategy& strategy);

// How a parameter is split: along `dim`, in `stride` interleaved blocks (a
// fused q/k/v weight is 3 blocks, each split on its own, so that every rank
// holds its heads' q, k and v). Rank r holds chunk r of every block.
struct Split {
  int64_t dim = 0;
  int64_t stride = 1;
};
// Rank `rank`'s slice of `full` (a copy), and the full tensor from every
// rank's slice in rank order. Throws std::invalid_argument when a block's size
// along `dim` is not a multiple of `size`, naming both.
at::Tensor shard_of(const at::Tensor& full, Split split, int64_t rank, int64_t size);
at::Tensor unshard(const std::vector<at::Tensor>& pieces, Split split);
// Every rank's `tensor` (same shape everywhere), in rank order; no autograd.
std::vector<at::Tensor> all_gather(const Group& group, const at::Tensor& tensor);

// The collectives as autograd functions (identity for a group of one).
// Forward identity, backward all-reduce of the gradient: a split region's entry.
at::Tensor copy_to_tensor_parallel(const at::Tensor& x, const Group& group);
// Forward all-reduce (sum), backward identity: a split region's exit.
at::Tensor reduce_from_tensor_parallel(const at::Tensor& x, const Group& group);
// Forward: the ranks' parts concatenated along the last dimension; backward:
// this rank's part of the gradient.
at::Tensor gather_from_tensor_parallel(const at::Tensor& x, const Group& group);
// Forward: this rank's part along the last dimension; backward: the gathered gradient.
at::Tensor scatter_to_tensor_parallel(const at::Tensor& x, const Group& group);

// Random numbers inside split regions (dropout of this rank's heads or MLP
// slice): one generator per tensor-parallel rank, so that peers draw different
// masks for their different slices, while the replicated regions keep the
// default generator, the same on every peer. Seeded with seed + 2718 + the
// tensor-parallel rank (Megatron's offset). Used before any seed was given, it
// takes the default generator's current seed (fabric.seed_everything's).
void manual_seed_parallel_region(const Group& group, uint64_t seed);
at::Generator parallel_region_generator(const Group& group, c10::Device device);
// Dropout of `x` inside a split region, with this rank's generator; for a
// group of one, torch's dropout (the default generator).
at::Tensor dropout(const at::Tensor& x, double p, bool training, const Group& group);

// What model_parallel asks a split layer: which of its parameters are split,
// and how (the others are replicated on every rank of the group). The strategy
// gathers them for full checkpoints and counts their gradients once in clipping.
class ParallelLayer {
 public:
  virtual ~ParallelLayer() = default;
  virtual std::vector<std::pair<at::Tensor, Split>> split_parameters() const = 0;
  virtual const Group& group() const = 0;
};

struct ColumnParallelLinearOptions {
  // Gather every rank's outputs (the full output on every rank) instead of
  // leaving each rank its part; needs stride 1.
  bool gather_output = false;
  // Interleaved blocks of the output (3 for a fused q/k/v projection).
  int64_t stride = 1;
};

// y = x W^T + b with W (and b) split by output rows: this rank's out/size outputs.
class ColumnParallelLinearImpl : public torch::nn::Module, public ParallelLayer {
 public:
  // `full` is the whole layer, initialised; its weight and bias are sliced.
  ColumnParallelLinearImpl(Group group, const torch::nn::Linear& full,
                           ColumnParallelLinearOptions options = {});
  at::Tensor forward(const at::Tensor& x);
  std::vector<std::pair<at::Tensor, Split>> split_parameters() const override;
  const Group& group() const override { return group_; }
  at::Tensor weight, bias;

 private:
  Group group_;
  ColumnParallelLinearOptions options_;
};
TORCH_MODULE(ColumnParallelLinear);

struct RowParallelLinearOptions {
  // The input is already split along its last dimension (a ColumnParallelLinear's
  // output); false splits a whole input first.
  bool input_is_parallel = true;
};

// y = x W^T + b with W split by input columns; b is whole, added once after the
// all-reduce.
class RowParallelLinearImpl : public torch::nn::Module, public ParallelLayer {
 public:
  RowParallelLinearImpl(Group group, const torch::nn::Linear& full,
                        RowParallelLinearOptions options = {});
  at::Tensor forward(const at::Tensor& x);
  std::vector<std::pair<at::Tensor, Split>> split_parameters() const override;
  const Group& group() const override { return group_; }
  at::Tensor weight, bias;

 private:
  Group group_;
  RowParallelLinearOptions options_;
};
TORCH_MODULE(RowParallelLinear);

// An embedding whose rows (the vocabulary) are split: each rank looks up the
// ids in its range, zeros for the others, and one all-reduce sums them.
class VocabParallelEmbeddingImpl : public torch::nn::Module, public ParallelLayer {
 public:
  VocabParallelEmbeddingImpl(Group group, const torch::nn::Embedding& full);
  at::Tensor forward(const at::Tensor& ids);
  std::vector<std::pair<at::Tensor, Split>> split_parameters() const override;
  const Group& group() const override { return group_; }
  // This rank's rows [vocab_start, vocab_start + weight.size(0)).
  int64_t vocab_start() const { return vocab_start_; }
  at::Tensor weight;

 private:
  Group group_;
  int64_t vocab_start_ = 0;
};
TORCH_MODULE(VocabParallelEmbedding);

// The mean cross-entropy of logits whose last dimension is split over the group
// (rank r holds vocabulary entries [r*V/size, (r+1)*V/size)), against whole
// targets: three all-reduces (the max, the target's logit, the sum of
// exponentials) and a local backward, so the whole logits never exist on one
// rank. For a group of one, torch's cross_entropy. Every target counts (no
// ignore_index).
at::Tensor vocab_parallel_cross_entropy(const at::Tensor& local_logits, const at::Tensor& targets,
                                        const Group& group);

}  // namespace fabric::tp
