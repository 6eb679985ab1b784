// The sharded layout torchfabric wrote before it wrote DCP directories
// (shard_<rank>.pt per rank + metadata.pt), read so that such checkpoints keep
// loading; nothing writes it any more. Internal to checkpoint/.
#pragma once

#include <string>

#include <ATen/core/ivalue.h>

namespace fabric::legacy_sharded {

// The file whose presence marks a complete directory of this layout.
extern const char* const kMetadataFile;
// The full checkpoint dict of such a directory; errors name the missing or damaged file.
c10::IValue read(const std::string& dir);

}  // namespace fabric::legacy_sharded
