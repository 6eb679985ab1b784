// "single_device": one process, one device; nothing to synchronise.
#pragma once

#include "strategies/strategy.h"

namespace fabric::strategies {

class SingleDeviceStrategy : public Strategy {
 public:
  explicit SingleDeviceStrategy(c10::Device device) : device_(device) {}

  std::string name() const override { return "single_device"; }
  c10::Device root_device() const override { return device_; }
  void setup_module(torch::nn::Module& module) override;

 private:
  c10::Device device_;
};

}  // namespace fabric::strategies
