// A character-level GPT (after nanoGPT): token and position embeddings, n_layer
// transformer blocks (causal self-attention and an MLP, pre-LayerNorm), a final
// LayerNorm and a head onto the vocabulary (tied to the token embedding or not).
// Each block is a fabric::Sharded unit, so under --strategy fsdp only one
// block's full parameters exist at a time; under every other strategy the
// blocks are plain modules.
#pragma once

#include <cstdint>
#include <vector>

#include <torch/nn/module.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>

#include "fabric/sharded.h"

struct GptConfig {
  int64_t vocab_size = 256;  // bytes
  int64_t block_size = 64;   // context length
  int64_t n_layer = 4;
  int64_t n_head = 4;
  int64_t n_embd = 128;
  bool tied_head = true;  // the head reuses the token embedding's weight
};

struct CausalSelfAttentionImpl : torch::nn::Module {
  explicit CausalSelfAttentionImpl(const GptConfig& config);
  torch::Tensor forward(const torch::Tensor& x);
  torch::nn::Linear qkv{nullptr}, proj{nullptr};
  int64_t n_head;
};
TORCH_MODULE(CausalSelfAttention);

struct GptBlockImpl : torch::nn::Module {
  explicit GptBlockImpl(const GptConfig& config);
  torch::Tensor forward(torch::Tensor x);
  torch::nn::LayerNorm ln_1{nullptr}, ln_2{nullptr};
  CausalSelfAttention attn{nullptr};
  torch::nn::Linear fc{nullptr}, fc_proj{nullptr};
};

struct GptImpl : torch::nn::Module {
  explicit GptImpl(const GptConfig& config);
  // Token ids [batch, time] (time <= block_size) -> logits [batch, time, vocab].
  torch::Tensor forward(const torch::Tensor& idx);
  int64_t num_parameters() const;

  GptConfig config;
  torch::nn::Embedding wte{nullptr}, wpe{nullptr};
  std::vector<fabric::Sharded<GptBlockImpl>> blocks;
  torch::nn::LayerNorm ln_f{nullptr};
  torch::nn::Linear head{nullptr};  // untied head only
};
TORCH_MODULE(Gpt);
