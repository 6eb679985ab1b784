// libFuzzer target: fabric::dcp::read_metadata (checkpoint/dcp_metadata.h) on
// fuzzed bytes as a distributed checkpoint's .metadata: the plain-pickle path
// of our unpickler (read_pickle), Python objects as dict keys (MetadataIndex),
// and the checks on what the pickle claims (dtypes, sizes, chunks inside and
// covering their tensor, storage records). tests/fuzz/make_seeds.py writes
// seeds from .metadata files PyTorch's dcp.save really writes.
//
// An exception is the correct answer to a bad input; a crash, abort, sanitizer
// report or timeout is a finding.
#include <cstddef>
#include <cstdint>
#include <exception>

#include <c10/util/Exception.h>

#include "checkpoint/dcp_metadata.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  for (bool whole : {true, false}) {
    try {
      fabric::dcp::read_metadata(reinterpret_cast<const char*>(data), size, "fuzz", whole);
    } catch (const c10::Error&) {
    } catch (const std::exception&) {
    }
  }
  return 0;
}
