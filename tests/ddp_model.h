// The model and data shared by the DDP worker program and its single-process
// reference in ddp_test.cpp.
#pragma once

#include <torch/torch.h>

#include <ATen/CPUGeneratorImpl.h>

struct DdpMlpImpl : torch::nn::Module {
  explicit DdpMlpImpl(bool with_unused = false)
      : fc1(register_module("fc1", torch::nn::Linear(6, 16))),
        fc2(register_module("fc2", torch::nn::Linear(16, 2))) {
    if (with_unused) extra = register_module("extra", torch::nn::Linear(2, 2));
  }
  torch::Tensor forward(torch::Tensor x) { return fc2->forward(torch::tanh(fc1->forward(x))); }
  torch::nn::Linear fc1, fc2, extra{nullptr};
};

// find_unused_parameters case: `extra` is used only by rank 1's half of the
// batch and only at even steps; at odd steps no rank uses it.
inline bool ddp_extra_used(int64_t rank, int step) { return rank == 1 && step % 2 == 0; }
inline torch::Tensor ddp_extra_term(DdpMlpImpl& model, const torch::Tensor& out) {
  return 0.1 * model.extra->forward(out).pow(2).mean();
}

// The global batch of step `step`: 16 rows, the same on every rank.
inline std::pair<torch::Tensor, torch::Tensor> ddp_global_batch(int step) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(1000 + step);
  auto x = torch::randn({16, 6}, gen);
  auto y = torch::randn({16, 2}, gen);
  return {x, y};
}
