// Memory an optimizer's parameters, their gradients and its per-parameter state
// hold, each storage counted once: what a rank keeps between steps (under FSDP,
// about 1/N of DDP's). For memory reports, benchmarks and tests.
#pragma once

#include <cstdint>

namespace torch::optim {
class Optimizer;
}

namespace fabric::optim {

// Counts the state tensors the optimizer's codec names (optim/codec.h).
int64_t state_bytes(torch::optim::Optimizer& optimizer);

}  // namespace fabric::optim
