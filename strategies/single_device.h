// "single_device": one process, one device; nothing to synchronise. On cuda:N it
// makes cuda:N the current CUDA device, so kernels and allocations the user does
// not place explicitly land there too.
#pragma once

#include "strategies/strategy.h"

namespace fabric::strategies {

class SingleDeviceStrategy : public Strategy {
 public:
  explicit SingleDeviceStrategy(c10::Device device);

  std::string name() const override { return "single_device"; }
  c10::Device root_device() const override { return device_; }
  const Topology& topology() const override { return topology_; }
  void setup_environment() override;
  void module_to_device(torch::nn::Module& module) override;
  void setup_module(torch::nn::Module& module) override;

 private:
  c10::Device device_;
  Topology topology_;
};

}  // namespace fabric::strategies
