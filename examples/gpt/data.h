// The GPT example's data: Debian's fortune cookies as one byte tensor, and
// random training windows from it.
#pragma once

#include <cstdint>
#include <string>
#include <utility>

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

// Every plain-text fortune file in `dir` (names without a dot; the .dat files
// are indexes), in name order, as int64 byte values. Throws when there is none,
// saying how to install it.
at::Tensor load_fortunes(const std::string& dir = "/usr/share/games/fortunes");

// `batch` random windows of block + 1 tokens: inputs [batch, block] and the
// next-token targets.
std::pair<at::Tensor, at::Tensor> get_batch(const at::Tensor& data, int64_t batch, int64_t block,
                                            at::Generator& gen);
