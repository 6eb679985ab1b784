#include "optim/codec.h"

#include <mutex>
#include <sstream>
#include <stdexcept>

#include <ATen/ops/scalar_tensor.h>

namespace fabric::optim {

std::vector<std::shared_ptr<const OptimizerCodec>> builtin_codecs();  // builtin_codecs.cpp

namespace {

std::string shape(at::IntArrayRef sizes) {
  std::ostringstream out;
  out << sizes;
  return out.str();
}

double as_double(const c10::IValue& v, const std::string& what, const std::string& key) {
  if (v.isDouble()) return v.toDouble();
  if (v.isInt()) return static_cast<double>(v.toInt());
  if (v.isBool()) return v.toBool() ? 1.0 : 0.0;
  if (v.isTensor() && v.toTensor().numel() == 1) return v.toTensor().item<double>();
  throw std::runtime_error(what + ": '" + key + "' should be a number but the checkpoint holds a " +
                           v.tagKind());
}

struct Registry {
  std::mutex mutex;
  std::vector<std::shared_ptr<const OptimizerCodec>> codecs;  // registered first, then built in
  Registry() : codecs(builtin_codecs()) {}
};

Registry& registry() {
  static Registry instance;
  return instance;
}

// The codecs' names, in the order they are asked; the caller holds the lock.
std::string names_locked(const Registry& r) {
  std::string names;
  for (const auto& codec : r.codecs) names += (names.empty() ? "" : ", ") + codec->name();
  return names;
}

}  // namespace

c10::IValue GroupEntry::get(const std::string& key) const {
  auto it = dict_.find(key);
  if (it == dict_.end()) {
    throw std::runtime_error(what_ + ": the checkpoint's optimizer state has no '" + key + "'");
  }
  return it->value();
}

double GroupEntry::number(const std::string& key) const { return as_double(get(key), what_, key); }

bool GroupEntry::flag(const std::string& key) const {
  const auto v = get(key);
  return v.isBool() ? v.toBool() : as_double(v, what_, key) != 0;
}

std::pair<double, double> GroupEntry::pair(const std::string& key) const {
  const auto v = get(key);
  std::vector<c10::IValue> items;
  if (v.isTuple()) {
    const auto& elements = v.toTupleRef().elements();
    items.assign(elements.begin(), elements.end());
  } else if (v.isList()) {
    for (const auto& item : v.toListRef()) items.push_back(item);
  }
  if (items.size() != 2) {
    throw std::runtime_error(what_ + ": '" + key + "' should be a pair of numbers but the " +
                             "checkpoint holds a " + v.tagKind());
  }
  return {as_double(items[0], what_, key), as_double(items[1], what_, key)};
}

at::Tensor StateEntry::tensor(const char* name) const {
  auto it = dict_.find(name);
  if (it == dict_.end() || it->value().isNone()) return {};
  if (!it->value().isTensor()) {
    throw std::runtime_error(what_ + ": state '" + name + "' of parameter " +
                             std::to_string(index_) + " is a " + it->value().tagKind() +
                             ", not a tensor");
  }
  const auto value = it->value().toTensor();
  if (value.sizes() != param_.sizes()) {
    throw std::runtime_error(what_ + ": state '" + name + "' of parameter " +
                             std::to_string(index_) + " has shape " + shape(value.sizes()) +
                             " but the parameter has " + shape(param_.sizes()));
  }
  return value.to(param_.options()).clone();
}

int64_t StateEntry::step() const {
  auto it = dict_.find("step");
  if (it == dict_.end()) return 0;
  return static_cast<int64_t>(as_double(it->value(), what_, "step"));
}

const OptimizerCodec& codec_for(const torch::optim::OptimizerOptions& options) {
  auto& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  for (const auto& codec : r.codecs) {
    if (codec->handles(options)) return *codec;
  }
  throw std::invalid_argument(
      "this optimizer type has no state-dict codec, so its state cannot be saved, loaded or "
      "sharded; optimizers with one: " + names_locked(r) +
      " (add one with fabric::optim::register_codec, optim/codec.h)");
}

void register_codec(std::shared_ptr<const OptimizerCodec> codec) {
  if (!codec) throw std::invalid_argument("register_codec: the codec is null");
  auto& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  r.codecs.insert(r.codecs.begin(), std::move(codec));
}

std::string codec_names() {
  auto& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  return names_locked(r);
}

at::Tensor step_tensor(int64_t step) {
  return at::scalar_tensor(static_cast<double>(step), at::TensorOptions().dtype(at::kFloat));
}

}  // namespace fabric::optim
