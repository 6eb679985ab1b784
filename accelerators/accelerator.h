// Accelerators: which kind of device a Fabric runs on and which of them it uses.
// "cpu" runs `devices` processes on the host; "cuda" (alias "gpu") uses the
// visible NVIDIA GPUs. "auto" picks cuda when LibTorch sees a GPU, else cpu.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <c10/core/Device.h>

#include "accelerators/devices.h"

namespace fabric {

class Accelerator {
 public:
  virtual ~Accelerator() = default;
  virtual std::string name() const = 0;
  virtual c10::DeviceType device_type() const = 0;
  // How many devices "auto" means on this machine.
  virtual int64_t auto_device_count() const = 0;
  // This node's devices, one per local rank; throws std::invalid_argument naming
  // the request and what the machine has.
  virtual std::vector<c10::Device> parse_devices(const Devices& devices) const = 0;
};

// "auto", "cpu", "cuda", "gpu".
std::vector<std::string> valid_accelerators();
// Number of CUDA devices LibTorch can use here (0 on a machine without a GPU).
int64_t cuda_device_count();
// Builds the accelerator for `name` ("auto" resolved); throws std::invalid_argument
// for an unknown name or for "cuda" on a machine without a GPU.
std::shared_ptr<Accelerator> make_accelerator(const std::string& name);

}  // namespace fabric
