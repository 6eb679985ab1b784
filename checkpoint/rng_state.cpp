#include "checkpoint/rng_state.h"

#include <mutex>
#include <stdexcept>

#include <ATen/Context.h>
#include <torch/cuda.h>

namespace fabric {
namespace {

// Lightning's key for the CUDA generators (lightning/fabric/utilities/seed.py).
constexpr const char* kCudaKey = "torch.cuda";

}  // namespace

RngState RngState::capture() {
  RngState state;
  auto cpu = at::globalContext().defaultGenerator(c10::Device(c10::DeviceType::CPU));
  {
    std::lock_guard<std::mutex> lock(cpu.mutex());
    state.cpu = cpu.get_state();
  }
  const auto devices = static_cast<size_t>(torch::cuda::device_count());
  for (size_t i = 0; i < devices; ++i) {
    auto gen = at::globalContext().defaultGenerator(
        c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(i)));
    std::lock_guard<std::mutex> lock(gen.mutex());
    state.cuda.push_back(gen.get_state());
  }
  return state;
}

void RngState::restore() const {
  if (!cpu.defined()) throw std::invalid_argument("RngState::restore: no CPU generator state");
  auto gen = at::globalContext().defaultGenerator(c10::Device(c10::DeviceType::CPU));
  {
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(cpu);
  }
  const auto devices = static_cast<size_t>(torch::cuda::device_count());
  for (size_t i = 0; i < cuda.size() && i < devices; ++i) {
    auto g = at::globalContext().defaultGenerator(
        c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(i)));
    std::lock_guard<std::mutex> lock(g.mutex());
    g.set_state(cuda[i]);
  }
}

c10::IValue RngState::to_ivalue() const {
  c10::impl::GenericDict dict(c10::StringType::get(), c10::AnyType::get());
  dict.insert("torch", cpu);
  c10::impl::GenericList list(c10::AnyType::get());
  for (const auto& t : cuda) list.push_back(c10::IValue(t));
  dict.insert(kCudaKey, list);
  return dict;
}

RngState RngState::from_ivalue(const c10::IValue& value) {
  if (!value.isGenericDict()) {
    throw std::runtime_error("RNG state entry is a " + value.tagKind() + ", not a dict");
  }
  auto dict = value.toGenericDict();
  RngState state;
  auto it = dict.find("torch");
  if (it == dict.end() || !it->value().isTensor()) {
    throw std::runtime_error("RNG state entry has no 'torch' tensor");
  }
  state.cpu = it->value().toTensor();
  auto cuda = dict.find(kCudaKey);
  if (cuda == dict.end()) cuda = dict.find("cuda");  // files from torchfabric 0.1
  if (cuda != dict.end() && cuda->value().isList()) {
    for (const auto& t : cuda->value().toList()) state.cuda.push_back(t.get().toTensor());
  }
  return state;
}

}  // namespace fabric
