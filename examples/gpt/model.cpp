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

// A Linear built and initialised whole, as the unsplit model does.
torch::nn::Linear whole_linear(int64_t in, int64_t out, bool bias = true) {
  torch::nn::Linear linear(torch::nn::LinearOptions(in, out).bias(bias));
  init_linear(linear);
  return linear;
}

void check_split(int64_t n, const fabric::tp::Group& tp, const std::string& what) {
  if (n % tp.size != 0) {
    throw std::invalid_argument("gpt: " + what + " (" + std::to_string(n) +
                                ") is not divisible by the tensor-parallel size " +
                                std::to_string(tp.size) + "; choose a --tensor-parallel-size that divides it");
  }
}
}  // namespace

CausalSelfAttentionImpl::CausalSelfAttentionImpl(const GptConfig& config, const fabric::tp::Group& tp)
    : n_head(config.n_head / tp.size) {
  check_split(config.n_head, tp, "--n-head");
  // Built, then initialised, in the order of the unsplit model (same random draws).
  torch::nn::Linear qkv_full(config.n_embd, 3 * config.n_embd), proj_full(config.n_embd, config.n_embd);
  init_linear(qkv_full);
  init_linear(proj_full);
  qkv = register_module("qkv", fabric::tp::ColumnParallelLinear(tp, qkv_full, fabric::tp::ColumnParallelLinearOptions{.stride = 3}));
  proj = register_module("proj", fabric::tp::RowParallelLinear(tp, proj_full));
}

torch::Tensor CausalSelfAttentionImpl::forward(const torch::Tensor& x) {
  const int64_t batch = x.size(0), time = x.size(1);
  const int64_t local = qkv->weight.size(0) / 3;  // this rank's channels: n_head heads
  auto parts = qkv->forward(x).split(local, 2);
  auto heads = [&](const torch::Tensor& t) {
    return t.view({batch, time, n_head, local / n_head}).transpose(1, 2);
  };
  auto y = at::scaled_dot_product_attention(heads(parts[0]), heads(parts[1]), heads(parts[2]),
                                            /*attn_mask=*/{}, /*dropout_p=*/0.0, /*is_causal=*/true);
  return proj->forward(y.transpose(1, 2).contiguous().view({batch, time, local}));
}

GptBlockImpl::GptBlockImpl(const GptConfig& config, const fabric::tp::Group& tp) {
  ln_1 = register_module("ln_1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({config.n_embd})));
  attn = register_module("attn", CausalSelfAttention(config, tp));
  ln_2 = register_module("ln_2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({config.n_embd})));
  check_split(4 * config.n_embd, tp, "the MLP width 4 x --n-embd");
  torch::nn::Linear fc_full(config.n_embd, 4 * config.n_embd), fc_proj_full(4 * config.n_embd, config.n_embd);
  init_linear(fc_full);
  init_linear(fc_proj_full);
  fc = register_module("fc", fabric::tp::ColumnParallelLinear(tp, fc_full));
  fc_proj = register_module("fc_proj", fabric::tp::RowParallelLinear(tp, fc_proj_full));
}

torch::Tensor GptBlockImpl::forward(torch::Tensor x) {
  x = x + attn->forward(ln_1->forward(x));
  return x + fc_proj->forward(torch::gelu(fc->forward(ln_2->forward(x))));
}

GptImpl::GptImpl(const GptConfig& cfg, fabric::tp::Group group) : config(cfg), tp(std::move(group)) {
  if (cfg.n_embd % cfg.n_head != 0) {
    throw std::invalid_argument("gpt: n_embd (" + std::to_string(cfg.n_embd) +
                                ") must be a multiple of n_head (" + std::to_string(cfg.n_head) + ")");
  }
  check_split(cfg.vocab_size, tp, "the vocabulary size");
  torch::nn::Embedding wte_full(cfg.vocab_size, cfg.n_embd);
  wpe = torch::nn::Embedding(cfg.block_size, cfg.n_embd);
  {
    torch::NoGradGuard no_grad;
    torch::nn::init::normal_(wte_full->weight, 0.0, 0.02);
    torch::nn::init::normal_(wpe->weight, 0.0, 0.02);
  }
  wte = register_module("wte", fabric::tp::VocabParallelEmbedding(tp, wte_full));
  register_module("wpe", wpe);
  for (int64_t i = 0; i < cfg.n_layer; ++i) {
    blocks.push_back(register_module("h" + std::to_string(i), fabric::Sharded<GptBlockImpl>(cfg, tp)));
  }
  ln_f = register_module("ln_f", torch::nn::LayerNorm(torch::nn::LayerNormOptions({cfg.n_embd})));
  if (!cfg.tied_head) {
    head = register_module("head", fabric::tp::ColumnParallelLinear(
                                       tp, whole_linear(cfg.n_embd, cfg.vocab_size, /*bias=*/false)));
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
  // The tied head is column-parallel over the embedding's vocabulary rows.
  return config.tied_head ? torch::matmul(fabric::tp::copy_to_tensor_parallel(x, tp), wte->weight.t())
                          : head->forward(x);
}

torch::Tensor GptImpl::loss(const torch::Tensor& logits, const torch::Tensor& targets) const {
  return fabric::tp::vocab_parallel_cross_entropy(logits.to(torch::kFloat), targets, tp);
}

torch::Tensor GptImpl::full_logits(const torch::Tensor& logits) const {
  return fabric::tp::gather_from_tensor_parallel(logits, tp);
}

int64_t GptImpl::num_parameters() const {
  int64_t n = 0;
  for (const auto& p : parameters()) n += p.numel();
  return n;
}
