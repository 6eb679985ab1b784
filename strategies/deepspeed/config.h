// DeepSpeed's JSON config (ds_config.json) for strategy="deepspeed": the file
// these users already have, read with nlohmann-json (Debian's). What it may set:
//   zero_optimization.{stage, offload_optimizer.device, offload_param.device,
//     reduce_bucket_size, allgather_bucket_size, overlap_comm, contiguous_gradients}
//   gradient_clipping, fp16.{enabled, loss_scale, initial_scale_power,
//     loss_scale_window, hysteresis, min_loss_scale}, bf16.enabled,
//   train_micro_batch_size_per_gpu, gradient_accumulation_steps (1 only: the
//   loop accumulates with fabric.no_backward_sync), train_batch_size (checked).
// A key that would change the training and is not implemented here (an
// "optimizer" or "scheduler" section, nvme offload, gradient_accumulation_steps
// above 1) is an error naming it; other unknown keys (logging, tuning knobs) are
// listed in one warning. "auto" (Hugging Face's placeholder) keeps the default.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "strategies/options.h"

namespace fabric::strategies {

struct DeepSpeedConfigResult {
  // fp16.enabled / bf16.enabled when the file has them: the precision must agree.
  std::optional<bool> fp16, bf16;
  // Keys the file has that nothing here reads ("steps_per_print", ...).
  std::vector<std::string> ignored;
};

// Reads `path` into `options` (world_size checks train_batch_size; 0: not). Throws
// std::invalid_argument naming the file and the key for what cannot be applied.
DeepSpeedConfigResult apply_deepspeed_config(const std::string& path, int64_t world_size,
                                             DeepSpeedOptions& options);
// The same from a JSON text (`origin` names it in errors).
DeepSpeedConfigResult apply_deepspeed_config_text(const std::string& text, const std::string& origin,
                                                  int64_t world_size, DeepSpeedOptions& options);

}  // namespace fabric::strategies
