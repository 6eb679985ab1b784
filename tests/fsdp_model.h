// The model and data shared by the fsdp worker program and its one-process
// reference in fsdp_test.cpp. Sizes are chosen so that, at 2 ranks, the
// flattened units need padding (57 elements per block), a parameter straddles
// the rank boundary (embed.weight in the root, fc.weight in each block) and a
// parameter has no elements on one rank (each block's fc.bias lies wholly on
// rank 1).
#pragma once

#include <torch/torch.h>

#include <ATen/CPUGeneratorImpl.h>

#include "fabric/sharded.h"
#include "optim/fused.h"

struct FsdpBlockImpl : torch::nn::Module {
  explicit FsdpBlockImpl(int64_t width = 7)
      : fc(register_module("fc", torch::nn::Linear(width, width))),
        scale(register_parameter("scale", torch::full({1}, 0.5))) {}
  torch::Tensor forward(torch::Tensor x) { return x + scale * torch::tanh(fc->forward(x)); }
  torch::nn::Linear fc;
  torch::Tensor scale;
};
TORCH_MODULE(FsdpBlock);

// sequential=false: three fabric::Sharded blocks (the middle one called twice
// per forward) between a root embedding and head. sequential=true: the same
// blocks as plain children of a torch::nn::Sequential (for auto-wrap), each
// called once. `width` scales the blocks (the memory test uses wide ones).
struct FsdpNetImpl : torch::nn::Module {
  explicit FsdpNetImpl(bool sequential = false, int64_t width = 7) : sequential_(sequential) {
    embed = register_module("embed", torch::nn::Linear(5, width));
    if (sequential) {
      blocks = register_module("blocks", torch::nn::Sequential(FsdpBlock(width), FsdpBlock(width),
                                                               FsdpBlock(width)));
    } else {
      for (int i = 0; i < 3; ++i) {
        units.push_back(register_module("b" + std::to_string(i),
                                        fabric::Sharded<FsdpBlockImpl>(width)));
      }
    }
    head = register_module("head", torch::nn::Linear(width, 3));
  }
  torch::Tensor forward(torch::Tensor x) {
    x = embed->forward(x);
    if (sequential_) {
      x = blocks->forward(x);
    } else {
      x = units[0](x);
      x = units[1](x);
      x = units[1](x);  // a unit called twice in one forward
      x = units[2](x);
    }
    return head->forward(torch::tanh(x));
  }
  bool sequential_;
  torch::nn::Linear embed{nullptr}, head{nullptr};
  torch::nn::Sequential blocks{nullptr};
  std::vector<fabric::Sharded<FsdpBlockImpl>> units;
};

// A block with a second output from its own `aux` layer, which a loss may use
// or not (a conditional loss term: the aux parameters then get a gradient on
// some ranks only).
struct FsdpAuxBlockImpl : torch::nn::Module {
  FsdpAuxBlockImpl()
      : fc(register_module("fc", torch::nn::Linear(7, 7))),
        aux(register_module("aux", torch::nn::Linear(7, 2))) {}
  std::tuple<torch::Tensor, torch::Tensor> forward(torch::Tensor x) {
    return {x + torch::tanh(fc->forward(x)), aux->forward(x)};
  }
  torch::nn::Linear fc, aux;
};

// Root embedding and head, two aux blocks in a row, and a `side` unit on the
// embedding whose output a loss may leave out (the whole unit then gets no
// gradient in that backward).
struct FsdpAuxNetImpl : torch::nn::Module {
  FsdpAuxNetImpl() {
    embed = register_module("embed", torch::nn::Linear(5, 7));
    b0 = register_module("b0", fabric::Sharded<FsdpAuxBlockImpl>(std::make_shared<FsdpAuxBlockImpl>()));
    b1 = register_module("b1", fabric::Sharded<FsdpAuxBlockImpl>(std::make_shared<FsdpAuxBlockImpl>()));
    side = register_module("side", fabric::Sharded<FsdpBlockImpl>(7));
    head = register_module("head", torch::nn::Linear(7, 3));
  }
  struct Out {
    torch::Tensor out, aux, side;
  };
  Out forward(torch::Tensor x) {
    auto e = embed->forward(x);
    auto [h0, a0] = b0(e);
    auto [h1, a1] = b1(h0);
    return {head->forward(torch::tanh(h1)), a0 + a1, side(e)};
  }
  torch::nn::Linear embed{nullptr}, head{nullptr};
  fabric::Sharded<FsdpAuxBlockImpl> b0{nullptr}, b1{nullptr};
  fabric::Sharded<FsdpBlockImpl> side{nullptr};
};
inline torch::Tensor fsdp_aux_term(const torch::Tensor& aux) { return 0.1 * aux.pow(2).mean(); }
inline torch::Tensor fsdp_side_term(const torch::Tensor& side) { return 0.1 * side.pow(2).mean(); }

// Freezes (requires_grad=false) every parameter whose name starts with one of
// `prefixes` ("root" stands for the parameters in no block: embed and head).
inline void fsdp_freeze(torch::nn::Module& model, const std::vector<std::string>& prefixes) {
  for (auto& item : model.named_parameters()) {
    for (const auto& prefix : prefixes) {
      const bool root = prefix == "root" && (item.key().rfind("embed.", 0) == 0 ||
                                             item.key().rfind("head.", 0) == 0);
      if (root || (prefix != "root" && item.key().rfind(prefix + ".", 0) == 0)) {
        item.value().set_requires_grad(false);
      }
    }
  }
}

// The global batch of step `step`: 16 rows, the same on every rank.
inline std::pair<torch::Tensor, torch::Tensor> fsdp_global_batch(int step) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(2000 + step);
  return {torch::randn({16, 5}, gen), torch::randn({16, 3}, gen)};
}

// The optimizers the tests compare: "adam", "adamw", "sgd" (with momentum), and
// "fused_adam", "fused_adamw", "fused_sgd" with the same options.
inline std::shared_ptr<torch::optim::Optimizer> fsdp_optimizer(const std::string& name,
                                                               std::vector<torch::Tensor> params) {
  // fused_adam, fused_adamw, fused_sgd: the same options in optim/fused.h's kernels
  if (name == "fused_adamw") {
    return std::make_shared<fabric::optim::FusedAdamW>(
        params, torch::optim::AdamWOptions(1e-2).weight_decay(0.1));
  }
  if (name == "fused_sgd") {
    return std::make_shared<fabric::optim::FusedSGD>(params, torch::optim::SGDOptions(0.05).momentum(0.9));
  }
  if (name == "fused_adam") return std::make_shared<fabric::optim::FusedAdam>(params, 1e-2);
  if (name == "adamw") {
    return std::make_shared<torch::optim::AdamW>(
        params, torch::optim::AdamWOptions(1e-2).weight_decay(0.1));
  }
  if (name == "sgd") {
    return std::make_shared<torch::optim::SGD>(params, torch::optim::SGDOptions(0.05).momentum(0.9));
  }
  return std::make_shared<torch::optim::Adam>(params, 1e-2);
}
