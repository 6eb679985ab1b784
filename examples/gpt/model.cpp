#include "model.h"

#include <stdexcept>
#include <string>

#include <torch/nn/functional/activation.h>
#include <torch/nn/init.h>
#include <torch/torch.h>

namespace {
void init_linear(torch::nn::Linear& linear) {
  torch::NoGradGuard no_grad;
  torch::nn::init::normal_(linear->weight, 0.0, 0.02);
  if (linear->bias.defined()) linear->bias.zero_();
}
}  // namespace

CausalSelfAttentionImpl::CausalSelfAttentionImpl(const GptConfig& config) : n_head(config.n_head) {
  qkv = register_module("qkv", torch::nn::Linear(config.n_embd, 3 * config.n_embd));
  proj = register_module("proj", torch::nn::Linear(config.n_embd, config.n_embd));
  init_linear(qkv);
  init_linear(proj);
}

torch::Tensor CausalSelfAttentionImpl::forward(const torch::Tensor& x) {
  const int64_t batch = x.size(0), time = x.size(1), channels = x.size(2);
  auto parts = qkv->forward(x).split(channels, 2);
  auto heads = [&](const torch::Tensor& t) {
    return t.view({batch, time, n_head, channels / n_head}).transpose(1, 2);
  };
  auto y = at::scaled_dot_product_attention(heads(parts[0]), heads(parts[1]), heads(parts[2]),
                                            /*attn_mask=*/{}, /*dropout_p=*/0.0, /*is_causal=*/true);
  return proj->forward(y.transpose(1, 2).contiguous().view({batch, time, channels}));
}

GptBlockImpl::GptBlockImpl(const GptConfig& config) {
  ln_1 = register_module("ln_1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({config.n_embd})));
  attn = register_module("attn", CausalSelfAttention(config));
  ln_2 = register_module("ln_2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({config.n_embd})));
  fc = register_module("fc", torch::nn::Linear(config.n_embd, 4 * config.n_embd));
  fc_proj = register_module("fc_proj", torch::nn::Linear(4 * config.n_embd, config.n_embd));
  init_linear(fc);
  init_linear(fc_proj);
}

torch::Tensor GptBlockImpl::forward(torch::Tensor x) {
  x = x + attn->forward(ln_1->forward(x));
  return x + fc_proj->forward(torch::gelu(fc->forward(ln_2->forward(x))));
}

GptImpl::GptImpl(const GptConfig& cfg) : config(cfg) {
  if (cfg.n_embd % cfg.n_head != 0) {
    throw std::invalid_argument("gpt: n_embd (" + std::to_string(cfg.n_embd) +
                                ") must be a multiple of n_head (" + std::to_string(cfg.n_head) + ")");
  }
  wte = register_module("wte", torch::nn::Embedding(cfg.vocab_size, cfg.n_embd));
  wpe = register_module("wpe", torch::nn::Embedding(cfg.block_size, cfg.n_embd));
  {
    torch::NoGradGuard no_grad;
    torch::nn::init::normal_(wte->weight, 0.0, 0.02);
    torch::nn::init::normal_(wpe->weight, 0.0, 0.02);
  }
  for (int64_t i = 0; i < cfg.n_layer; ++i) {
    blocks.push_back(register_module("h" + std::to_string(i), fabric::Sharded<GptBlockImpl>(cfg)));
  }
  ln_f = register_module("ln_f", torch::nn::LayerNorm(torch::nn::LayerNormOptions({cfg.n_embd})));
  if (!cfg.tied_head) {
    head = register_module("head", torch::nn::Linear(torch::nn::LinearOptions(cfg.n_embd, cfg.vocab_size).bias(false)));
    init_linear(head);
  }
}

torch::Tensor GptImpl::forward(const torch::Tensor& idx) {
  const int64_t time = idx.size(1);
  if (time > config.block_size) {
    throw std::invalid_argument("gpt: a sequence of " + std::to_string(time) +
                                " tokens is longer than block_size " + std::to_string(config.block_size));
  }
  auto positions = torch::arange(time, torch::TensorOptions().dtype(torch::kLong).device(idx.device()));
  auto x = wte->forward(idx) + wpe->forward(positions);
  for (auto& block : blocks) x = block(x);
  x = ln_f->forward(x);
  return config.tied_head ? torch::matmul(x, wte->weight.t()) : head->forward(x);
}

int64_t GptImpl::num_parameters() const {
  int64_t n = 0;
  for (const auto& p : parameters()) n += p.numel();
  return n;
}
