// The Fashion-MNIST classifier: an MLP 784 -> 512 -> 256 -> 10 with ReLU and dropout.
// Shared by the classifier example and the overhead benchmark.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/modules/container/sequential.h>

struct ClassifierImpl : torch::nn::Module {
  ClassifierImpl();
  // x: [N, 1, 28, 28] or [N, 784]; returns logits [N, 10].
  torch::Tensor forward(torch::Tensor x);

  torch::nn::Sequential layers;
};
