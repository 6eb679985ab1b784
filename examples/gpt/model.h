// A character-level GPT (after nanoGPT): token and position embeddings, n_layer
// transformer blocks (causal self-attention and an MLP, pre-LayerNorm), a final
// LayerNorm and a head onto the vocabulary (tied to the token embedding or not).
// Each block is a fabric::Sharded unit, so under --strategy fsdp only one
// block's full parameters exist at a time; under every other strategy the
// blocks are plain modules.
//
// Tensor parallelism (--strategy model_parallel): built with a fabric::tp group
// of N ranks, attention is split by heads (q/k/v column-parallel, the output
// projection row-parallel), the MLP column- then row-wise, the token embedding
// and the head by vocabulary. Every layer is built whole, in the unsplit
// model's order, and then split, so the split model starts from the unsplit
// one's weights and its checkpoints hold the unsplit state dict. With the
// default group of one every layer computes what a plain torch layer does.
#pragma once

#include <cstdint>
#include <vector>

#include <torch/nn/module.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>

#include "fabric/sharded.h"
#include "strategies/model_parallel/tensor_parallel.h"

struct GptConfig {
  int64_t vocab_size = 256;  // bytes
  int64_t block_size = 64;   // context length
  int64_t n_layer = 4;
  int64_t n_head = 4;
  int64_t n_embd = 128;
  bool tied_head = true;  // the head reuses the token embedding's weight
};

struct CausalSelfAttentionImpl : torch::nn::Module {
  CausalSelfAttentionImpl(const GptConfig& config, const fabric::tp::Group& tp);
  torch::Tensor forward(const torch::Tensor& x);
  fabric::tp::ColumnParallelLinear qkv{nullptr};  // this rank's heads' q, k and v
  fabric::tp::RowParallelLinear proj{nullptr};
  int64_t n_head;  // this rank's heads
};
TORCH_MODULE(CausalSelfAttention);

struct GptBlockImpl : torch::nn::Module {
  GptBlockImpl(const GptConfig& config, const fabric::tp::Group& tp);
  torch::Tensor forward(torch::Tensor x);
  torch::nn::LayerNorm ln_1{nullptr}, ln_2{nullptr};
  CausalSelfAttention attn{nullptr};
  fabric::tp::ColumnParallelLinear fc{nullptr};
  fabric::tp::RowParallelLinear fc_proj{nullptr};
};

struct GptImpl : torch::nn::Module {
  // Throws std::invalid_argument naming the sizes when n_head, 4 x n_embd or
  // the vocabulary do not split into tp.size parts.
  explicit GptImpl(const GptConfig& config, fabric::tp::Group tp = {});
  // Token ids [batch, time] (time <= block_size) -> logits [batch, time, vocab],
  // or under tensor parallelism this rank's part of the vocabulary's logits.
  torch::Tensor forward(const torch::Tensor& idx);
  // The mean cross-entropy of forward's logits against targets [batch, time]
  // (in float32; vocabulary-parallel under tensor parallelism).
  torch::Tensor loss(const torch::Tensor& logits, const torch::Tensor& targets) const;
  // forward's logits over the whole vocabulary (gathered under tensor parallelism).
  torch::Tensor full_logits(const torch::Tensor& logits) const;
  // Parameters of this rank's model (its slices under tensor parallelism).
  int64_t num_parameters() const;

  GptConfig config;
  fabric::tp::Group tp;
  fabric::tp::VocabParallelEmbedding wte{nullptr};
  torch::nn::Embedding wpe{nullptr};
  std::vector<fabric::Sharded<GptBlockImpl>> blocks;
  torch::nn::LayerNorm ln_f{nullptr};
  fabric::tp::ColumnParallelLinear head{nullptr};  // untied head only
};
TORCH_MODULE(Gpt);
