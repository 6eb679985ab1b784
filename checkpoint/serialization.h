// Writing c10::IValues in the file format of Python's torch.save: a zip archive
// with data.pkl (protocol-2 pickle, tensors as persistent storage references),
// data/<n> for each storage, byteorder and version.
//
// Why not torch::pickle_save: it tags every dict and list with its TorchScript
// type (torch.jit._pickle.restore_type_tag), which Python's torch.load rejects
// under its default weights_only=True. Here aggregates are written untagged, as
// Python writes them, so torch.load(path) just works. Reading uses
// torch::pickle_load, which accepts both.
#pragma once

#include <functional>
#include <vector>

#include <ATen/core/ivalue.h>

namespace fabric {

// Streams the archive to `sink` (no full copy in memory besides the pickle).
void serialize(const c10::IValue& value, const std::function<void(const char*, size_t)>& sink);
std::vector<char> serialize(const c10::IValue& value);

}  // namespace fabric
