#include "strategies/single_device.h"

#include <torch/nn/module.h>

namespace fabric::strategies {

void SingleDeviceStrategy::setup_module(torch::nn::Module& module) {
  module.to(device_);
}

}  // namespace fabric::strategies
