// A reader for the pickle inside torch.save's zip archives that understands what
// Python really writes, where LibTorch's own unpickler does not: an
// collections.OrderedDict (every model.state_dict(), with its _metadata) reads
// as a dict; a pickled Python object C++ cannot represent (argparse.Namespace,
// NumPy values, functions) reads as a placeholder dict
//   {"__python_class__": "argparse.Namespace", "__state__": {...}}
// with its state where it has one, and is reported in `notes` with its key path;
// torch.Size / tuples / sets read as tuples and lists, torch.dtype and
// torch.device as strings ("torch.float32", "cuda:0"). Tensors of every dtype
// are rebuilt over their storage records (read once: tensors that shared a
// storage in Python still share one), on the CPU.
//
// fabric's checkpoint reader reads every file with it: lengths, sizes and
// strides are checked against what the archive holds before anything is
// allocated, so a damaged or forged file ends in an error, not in a huge
// allocation (LibTorch's unpickler allocates a string's claimed length first).
// Given a MappedFile, stored records become views of the map instead of copies.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <ATen/core/ivalue.h>

namespace caffe2::serialize {
class PyTorchStreamReader;
}

namespace fabric {

class MappedFile;

// Why a tensor of `sizes` and `strides` starting at element `offset` does not
// fit a storage of `storage_numel` elements (a negative size, stride or offset,
// an extent that overflows, or one past the storage); empty when it fits.
std::string tensor_extent_problem(int64_t offset, at::IntArrayRef sizes, at::IntArrayRef strides,
                                  int64_t storage_numel);

// Unpickles the archive's data.pkl. Throws std::runtime_error naming `what` and
// the problem (an unknown opcode, a missing storage record, a malformed stream).
c10::IValue read_pickle_archive(caffe2::serialize::PyTorchStreamReader& reader,
                                const std::string& what, std::vector<std::string>* notes = nullptr,
                                std::shared_ptr<const MappedFile> file = nullptr);

// Unpickles a plain pickle (no archive, so no tensors), such as the .metadata
// of a distributed checkpoint. A Python object used as a dict key (DCP's
// MetadataIndex) reads as the tuple pickle_detail::object_key builds.
c10::IValue read_pickle(const char* data, size_t size, const std::string& what);

}  // namespace fabric
