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
