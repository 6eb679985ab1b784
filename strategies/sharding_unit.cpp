#include "strategies/sharding_unit.h"

#include <mutex>
#include <unordered_map>

#include <torch/nn/module.h>

#include "strategies/module_identity.h"

namespace fabric::strategies {
namespace {

std::mutex& registry_mutex() {
  static std::mutex mutex;
  return mutex;
}
std::unordered_map<const torch::nn::Module*, std::weak_ptr<torch::nn::Module>>& marks() {
  static std::unordered_map<const torch::nn::Module*, std::weak_ptr<torch::nn::Module>> map;
  return map;
}
// Keyed by address, checked by identity: a module built where a set-up one
// lived is not that unit.
std::unordered_map<const torch::nn::Module*, std::pair<ModuleIdentity, UnitRunner*>>& runners() {
  static std::unordered_map<const torch::nn::Module*, std::pair<ModuleIdentity, UnitRunner*>> map;
  return map;
}

}  // namespace

void mark_sharding_unit(const std::shared_ptr<torch::nn::Module>& module) {
  if (!module) return;
  std::lock_guard<std::mutex> lock(registry_mutex());
  auto& map = marks();
  // Drop marks of modules that are gone (their address may be reused).
  for (auto it = map.begin(); it != map.end();) {
    it = it->second.expired() ? map.erase(it) : std::next(it);
  }
  map[module.get()] = module;
}

bool is_marked_sharding_unit(const torch::nn::Module& module) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  auto it = marks().find(&module);
  if (it == marks().end()) return false;
  auto alive = it->second.lock();
  return alive && alive.get() == &module;
}

void set_unit_runner(const torch::nn::Module& module, UnitRunner* runner) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  auto& map = runners();
  for (auto it = map.begin(); it != map.end();) {
    it = it->second.first.expired() ? map.erase(it) : std::next(it);
  }
  if (runner) {
    map[&module] = {ModuleIdentity(module), runner};
  } else {
    map.erase(&module);
  }
}

UnitRunner* unit_runner(const torch::nn::Module& module) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  auto it = runners().find(&module);
  if (it == runners().end() || !it->second.first.is(module)) return nullptr;
  return it->second.second;
}

}  // namespace fabric::strategies
