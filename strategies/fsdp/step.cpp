// fsdp between backward and the next forward: the optimizer step on the pieces
// (with loss scaling), gradient clipping over every rank's shards.
#include "strategies/fsdp/units.h"

namespace fabric::strategies {

using namespace fsdp_detail;

void FSDPStrategy::setup_optimizer(torch::optim::Optimizer& optimizer) {
  Strategy::setup_optimizer(optimizer);
  if (!optimizer.state().empty()) {
    throw std::invalid_argument(
        "fsdp: the optimizer already has state (it has taken a step); its state would be "
        "full-sized on every rank. Create the optimizer fresh and call fabric.setup(model, "
        "optimizer) before the first step (load a checkpoint after setup to resume)");
  }
}

at::Tensor FSDPStrategy::optimizer_step(torch::optim::Optimizer& optimizer,
                                        const precision::LossClosure& closure) {
  // Under loss scaling the ranks agree on inf/nan inside the scaler's check (the
  // reducer set_precision installed).
  stepped_ = true;
  return precision_->optimizer_step(optimizer, closure);
}

void FSDPStrategy::backward(const at::Tensor& loss) {
  in_backward_ = true;
  try {
    precision_->pre_backward(loss).backward();
  } catch (...) {
    in_backward_ = false;
    throw;
  }
  in_backward_ = false;
  for (auto& state : modules_) {
    for (auto& unit : state->units) {
      unit->reset_backward();
      if (!sync_) {  // no_backward_sync: keep full parameters and gradients
        unit->holding = unit->holding || unit->needs_reduce;
        if (!unit->holding && unit->calls.empty()) reshard_unit(*unit);
        continue;
      }
      // Units not reduced inside the backward, in unit order on every rank.
      if (unit->needs_reduce) {
        reduce_unit(*unit);
      } else if (unit->calls.empty()) {
        reshard_unit(*unit);
      }
    }
  }
}

double FSDPStrategy::clip_gradients_norm(torch::nn::Module* module,
                                         torch::optim::Optimizer& optimizer, double max_norm,
                                         double norm_type, bool error_if_nonfinite) {
  if (!sharded()) {
    return Strategy::clip_gradients_norm(module, optimizer, max_norm, norm_type, error_if_nonfinite);
  }
  return clip_pieces_norm(optimizer, max_norm, norm_type, error_if_nonfinite);
}

}  // namespace fabric::strategies
