#include "checkpoint/serialization.h"

#include <exception>
#include <string>

#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/jit/serialization/pickler.h>
#include <torch/csrc/jit/serialization/pickler_helper.h>

namespace fabric {

void serialize(const c10::IValue& value, const std::function<void(const char*, size_t)>& sink) {
  std::vector<char> pickled;
  torch::jit::Pickler pickler(
      [&](const char* data, size_t size) { pickled.insert(pickled.end(), data, data + size); },
      /*tensor_table=*/nullptr, /*type_renamer=*/nullptr, /*memoized_class_types=*/nullptr,
      /*get_tensor_id=*/nullptr, /*tag_aggregates=*/false);
  pickler.protocol();
  pickler.pushIValue(value);
  pickler.stop();

  // The writer calls `sink` from C code (miniz) and finishes the archive in its
  // destructor: an exception must not cross either. A failing sink is recorded
  // and reported as a short write; the archive is then closed here (its
  // destructor would throw again and terminate) and the sink's own error, which
  // names the file and the OS error, is what the caller sees.
  std::exception_ptr sink_error;
  caffe2::serialize::PyTorchStreamWriter writer([&](const void* data, size_t size) -> size_t {
    if (sink_error) return 0;
    try {
      sink(static_cast<const char*>(data), size);
      return size;
    } catch (...) {
      sink_error = std::current_exception();
      return 0;
    }
  });
  try {
    writer.writeRecord("data.pkl", pickled.data(), pickled.size());
    static const std::string kByteOrder = "little";
    writer.writeRecord("byteorder", kByteOrder.data(), kByteOrder.size());
    const auto& storages = pickler.tensorData();
    for (size_t i = 0; i < storages.size(); ++i) {
      const auto data = torch::jit::getWriteableTensorData(storages[i]);
      writer.writeRecord("data/" + std::to_string(i), data.data(), data.sizeInBytes());
    }
    writer.writeEndOfFile();
  } catch (...) {
    if (!sink_error) sink_error = std::current_exception();
    try {
      writer.writeEndOfFile();  // marks the writer finished, so its destructor does nothing
    } catch (...) {
    }
  }
  if (sink_error) std::rethrow_exception(sink_error);
}

std::vector<char> serialize(const c10::IValue& value) {
  std::vector<char> out;
  serialize(value, [&](const char* data, size_t size) { out.insert(out.end(), data, data + size); });
  return out;
}

}  // namespace fabric
