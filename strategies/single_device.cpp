#include "strategies/single_device.h"

#include <torch/nn/module.h>

#include "strategies/nccl_backend.h"

namespace fabric::strategies {

SingleDeviceStrategy::SingleDeviceStrategy(c10::Device device) : device_(device) {
  topology_.parallel_devices = {device};
}

void SingleDeviceStrategy::setup_environment() {
  if (device_.is_cuda()) set_cuda_device(device_.index());
}

void SingleDeviceStrategy::module_to_device(torch::nn::Module& module) {
  setup_environment();
  module.to(device_);
}

void SingleDeviceStrategy::setup_module(torch::nn::Module& module) { module_to_device(module); }

}  // namespace fabric::strategies
