#include "optim/state_bytes.h"

#include <unordered_set>

#include <torch/optim/optimizer.h>

#include "optim/codec.h"

namespace fabric::optim {

int64_t state_bytes(torch::optim::Optimizer& optimizer) {
  std::unordered_set<const void*> seen;
  int64_t bytes = 0;
  auto add = [&](const at::Tensor& t) {
    if (t.defined() && seen.insert(t.storage().unsafeGetStorageImpl()).second) {
      bytes += static_cast<int64_t>(t.storage().nbytes());
    }
  };
  const auto& codec = codec_for(optimizer.defaults());
  for (auto& group : optimizer.param_groups()) {
    for (const auto& p : group.params()) {
      add(p);
      add(p.grad());
      auto it = optimizer.state().find(p.unsafeGetTensorImpl());
      if (it == optimizer.state().end()) continue;
      for (const auto* slot : codec.per_element_state(*it->second)) add(*slot);
    }
  }
  return bytes;
}

}  // namespace fabric::optim
