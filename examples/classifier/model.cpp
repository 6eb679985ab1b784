#include "model.h"

#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/linear.h>

ClassifierImpl::ClassifierImpl()
    : layers(register_module(
          "layers", torch::nn::Sequential(torch::nn::Linear(28 * 28, 512), torch::nn::ReLU(),
                                          torch::nn::Dropout(0.2), torch::nn::Linear(512, 256),
                                          torch::nn::ReLU(), torch::nn::Dropout(0.2),
                                          torch::nn::Linear(256, 10)))) {}

torch::Tensor ClassifierImpl::forward(torch::Tensor x) { return layers->forward(x.flatten(1)); }
