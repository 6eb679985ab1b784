#include "accelerators/accelerator.h"

#include <stdexcept>

#include <torch/cuda.h>

namespace fabric {
namespace {

class CPUAccelerator : public Accelerator {
 public:
  std::string name() const override { return "cpu"; }
  c10::DeviceType device_type() const override { return c10::DeviceType::CPU; }
  int64_t auto_device_count() const override { return 1; }

  std::vector<c10::Device> parse_devices(const Devices& devices) const override {
    int count = 1;
    if (devices.kind() == Devices::Kind::kList) {
      throw std::invalid_argument(
          "devices=" + devices.str() +
          " is not valid with accelerator='cpu': CPU devices are given as a number of "
          "processes (devices=1, 2, ...) or 'auto', not as a list of indices");
    }
    if (devices.kind() == Devices::Kind::kCount) count = devices.count();
    if (count <= 0) {
      throw std::invalid_argument("devices=" + devices.str() +
                                  " is not valid with accelerator='cpu': it must be a number "
                                  "of processes >= 1, or 'auto'");
    }
    return std::vector<c10::Device>(count, c10::Device(c10::DeviceType::CPU));
  }
};

class CUDAAccelerator : public Accelerator {
 public:
  std::string name() const override { return "cuda"; }
  c10::DeviceType device_type() const override { return c10::DeviceType::CUDA; }
  int64_t auto_device_count() const override { return cuda_device_count(); }

  std::vector<c10::Device> parse_devices(const Devices& devices) const override {
    const int64_t visible = cuda_device_count();
    std::vector<int> indices;
    if (devices.kind() == Devices::Kind::kList) {
      indices = devices.indices();
    } else {
      int64_t count = devices.kind() == Devices::Kind::kAuto ? visible : devices.count();
      if (count == -1) count = visible;
      if (count <= 0) {
        throw std::invalid_argument("devices=" + devices.str() +
                                    " is not valid with accelerator='cuda': use a count >= 1, "
                                    "-1 for all visible GPUs, a list of indices, or 'auto'");
      }
      for (int i = 0; i < count; ++i) indices.push_back(i);
    }
    std::vector<c10::Device> out;
    for (int index : indices) {
      if (index < 0 || index >= visible) {
        throw std::invalid_argument(
            "devices=" + devices.str() + " asks for CUDA device " + std::to_string(index) +
            ", but only " + std::to_string(visible) + " CUDA device(s) are visible" +
            (visible ? " (valid indices 0.." + std::to_string(visible - 1) + ")" : ""));
      }
      out.emplace_back(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(index));
    }
    return out;
  }
};

}  // namespace

std::vector<std::string> valid_accelerators() { return {"auto", "cpu", "cuda", "gpu"}; }

int64_t cuda_device_count() { return static_cast<int64_t>(torch::cuda::device_count()); }

std::shared_ptr<Accelerator> make_accelerator(const std::string& name) {
  if (name == "cpu") return std::make_shared<CPUAccelerator>();
  if (name == "auto") {
    if (cuda_device_count() > 0) return std::make_shared<CUDAAccelerator>();
    return std::make_shared<CPUAccelerator>();
  }
  if (name == "cuda" || name == "gpu") {
    if (cuda_device_count() == 0) {
      throw std::invalid_argument(
          "accelerator='" + name +
          "' was requested, but LibTorch sees no CUDA device on this machine. Valid values "
          "here: 'auto', 'cpu'");
    }
    return std::make_shared<CUDAAccelerator>();
  }
  throw std::invalid_argument("accelerator='" + name +
                              "' is not supported. Valid values: 'auto', 'cpu', 'cuda', 'gpu'");
}

}  // namespace fabric
