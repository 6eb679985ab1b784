#include "checkpoint/checkpoint.h"

#include "checkpoint/filesystem.h"
#include "checkpoint/mapped_file.h"
#include "checkpoint/pickle_reader.h"
#include "checkpoint/serialization.h"
#include "checkpoint/sharded_checkpoint.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <fstream>
#include <iterator>
#include <memory>
#include <stdexcept>
#include <unordered_map>
#include <sys/stat.h>
#include <unistd.h>

#include <c10/util/Exception.h>
#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/jit/serialization/import_read.h>
#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>
#include <torch/serialize.h>

namespace fabric {
namespace {

std::string directory_of(const std::string& path) {
  const auto slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

// Whether a None sits anywhere in a (nested) dict or list.
bool holds_none(const c10::IValue& v) {
  if (v.isNone()) return true;
  if (v.isGenericDict()) {
    for (const auto& item : v.toGenericDict()) {
      if (holds_none(item.value())) return true;
    }
  } else if (v.isList()) {
    for (const auto& item : v.toListRef()) {
      if (holds_none(item)) return true;
    }
  } else if (v.isTuple()) {
    for (const auto& item : v.toTupleRef().elements()) {
      if (holds_none(item)) return true;
    }
  }
  return false;
}

// Whether every tensor in `v` lies inside its storage (LibTorch's unpickler does
// not check a file's sizes and strides against its records).
bool tensors_in_bounds(const c10::IValue& v) {
  if (v.isTensor()) {
    const auto& t = v.toTensor();
    if (!t.defined()) return true;
    const auto numel = static_cast<int64_t>(t.storage().nbytes() / t.element_size());
    return tensor_extent_problem(t.storage_offset(), t.sizes(), t.strides(), numel).empty();
  }
  if (v.isGenericDict()) {
    for (const auto& item : v.toGenericDict()) {
      if (!tensors_in_bounds(item.value())) return false;
    }
  } else if (v.isList()) {
    for (const auto& item : v.toListRef()) {
      if (!tensors_in_bounds(item)) return false;
    }
  } else if (v.isTuple()) {
    for (const auto& item : v.toTupleRef().elements()) {
      if (!tensors_in_bounds(item)) return false;
    }
  }
  return true;
}

// `v` with every tensor copied into memory of its own (the same tensor twice
// stays one tensor), so nothing handed back views a mapped file.
c10::IValue owned(const c10::IValue& v,
                  std::unordered_map<const void*, at::Tensor>& copies) {
  if (v.isTensor()) {
    const auto& t = v.toTensor();
    if (!t.defined()) return v;
    auto it = copies.find(t.unsafeGetTensorImpl());
    if (it == copies.end()) it = copies.emplace(t.unsafeGetTensorImpl(), t.clone()).first;
    return it->second;
  }
  if (v.isGenericDict()) {
    const auto dict = v.toGenericDict();
    c10::impl::GenericDict out(dict.keyType(), dict.valueType());
    for (const auto& item : dict) out.insert(item.key(), owned(item.value(), copies));
    return out;
  }
  if (v.isList()) {
    c10::impl::GenericList out(v.toList().elementType());
    for (const auto& item : v.toListRef()) out.push_back(owned(item, copies));
    return out;
  }
  if (v.isTuple()) {
    std::vector<c10::IValue> items;
    for (const auto& item : v.toTupleRef().elements()) items.push_back(owned(item, copies));
    return c10::ivalue::Tuple::create(std::move(items));
  }
  return v;
}

c10::IValue owned(const c10::IValue& v) {
  std::unordered_map<const void*, at::Tensor> copies;
  return owned(v, copies);
}

[[noreturn]] void fail(const std::string& what, const std::string& path) {
  throw std::runtime_error(what + " " + path + ": " + std::strerror(errno));
}

using GenericDict = c10::impl::GenericDict;

GenericDict new_dict() { return GenericDict(c10::StringType::get(), c10::AnyType::get()); }

// Everything a strict load would object to, anywhere in `state`, found before
// anything is changed.
void check_into(const State& state, const GenericDict& dict, const std::string& prefix,
                std::vector<std::string>& problems) {
  for (const auto& [key, value] : state) {
    const std::string name = prefix + key;
    auto it = dict.find(key);
    if (it == dict.end()) {
      problems.push_back("'" + name + "' is not in the checkpoint");
      continue;
    }
    const c10::IValue& loaded = it->value();
    try {
      switch (value.kind()) {
        case StateValue::Kind::kModule: {
          auto report = check_module_state_dict(*value.module(), loaded, "'" + name + "'");
          if (!report.clean()) problems.push_back("module '" + name + "': " + report.describe());
          break;
        }
        case StateValue::Kind::kOptimizer:
          check_optimizer_state_dict(*value.optimizer(), loaded, "'" + name + "'");
          break;
        case StateValue::Kind::kRng:
          RngState::from_ivalue(loaded);
          break;
        case StateValue::Kind::kNested:
          if (!loaded.isGenericDict()) {
            problems.push_back("checkpoint entry '" + name + "' is a " + loaded.tagKind() +
                               ", expected a dict");
          } else {
            check_into(value.nested(), loaded.toGenericDict(), name + ".", problems);
          }
          break;
        case StateValue::Kind::kValue:
          break;
      }
    } catch (const std::exception& e) {
      problems.push_back(e.what());
    }
  }
}

void load_into(State& state, const GenericDict& dict, bool strict, const std::string& prefix,
               LoadResult& result) {
  for (auto& [key, value] : state) {
    const std::string name = prefix + key;
    auto it = dict.find(key);
    if (it == dict.end()) {
      result.missing_keys.push_back(name);
      continue;
    }
    const c10::IValue& loaded = it->value();
    switch (value.kind()) {
      case StateValue::Kind::kModule: {
        auto report = load_module_state_dict(*value.module(), loaded, strict, "'" + name + "'");
        for (auto& m : report.missing) result.mismatches.missing.push_back(name + "." + m);
        for (auto& m : report.unexpected) result.mismatches.unexpected.push_back(name + "." + m);
        for (auto& m : report.mismatched) result.mismatches.mismatched.push_back(name + "." + m);
        break;
      }
      case StateValue::Kind::kOptimizer:
        load_optimizer_state_dict(*value.optimizer(), loaded, "'" + name + "'");
        break;
      case StateValue::Kind::kRng: {
        auto rng = RngState::from_ivalue(owned(loaded));
        rng.restore();
        value = StateValue(rng);
        break;
      }
      case StateValue::Kind::kNested: {
        if (!loaded.isGenericDict()) {
          throw std::runtime_error("checkpoint entry '" + name + "' is a " + loaded.tagKind() +
                                   ", expected a dict");
        }
        load_into(value.nested(), loaded.toGenericDict(), strict, name + ".", result);
        break;
      }
      case StateValue::Kind::kValue:
        value = StateValue(owned(loaded));
        break;
    }
  }
  for (const auto& item : dict) {
    const auto key = item.key().toStringRef();
    if (!state.count(key)) result.remainder.emplace(key, StateValue(owned(item.value())));
  }
}

}  // namespace

StateValue::StateValue(std::shared_ptr<torch::nn::Module> module)
    : kind_(Kind::kModule), module_(std::move(module)) {
  if (!module_) throw std::invalid_argument("checkpoint state: a module is a null pointer");
}

StateValue::StateValue(std::shared_ptr<torch::optim::Optimizer> optimizer)
    : kind_(Kind::kOptimizer), optimizer_(std::move(optimizer)) {
  if (!optimizer_) throw std::invalid_argument("checkpoint state: an optimizer is a null pointer");
}

StateValue::StateValue(RngState rng) : kind_(Kind::kRng), rng_(std::move(rng)) {}

StateValue::StateValue(State nested)
    : kind_(Kind::kNested), nested_(std::make_shared<State>(std::move(nested))) {}

StateValue::StateValue(c10::IValue value) : kind_(Kind::kValue), value_(std::move(value)) {}

int64_t StateValue::to_int() const {
  if (kind_ == Kind::kValue && value_.isInt()) return value_.toInt();
  if (kind_ == Kind::kValue && value_.isTensor() && value_.toTensor().numel() == 1) {
    return value_.toTensor().item<int64_t>();
  }
  throw std::runtime_error("checkpoint value is a " + value_.tagKind() + ", not an integer");
}

double StateValue::to_double() const {
  if (kind_ == Kind::kValue && value_.isDouble()) return value_.toDouble();
  if (kind_ == Kind::kValue && value_.isInt()) return static_cast<double>(value_.toInt());
  throw std::runtime_error("checkpoint value is a " + value_.tagKind() + ", not a number");
}

std::string StateValue::to_string() const {
  if (kind_ == Kind::kValue && value_.isString()) return value_.toStringRef();
  throw std::runtime_error("checkpoint value is a " + value_.tagKind() + ", not a string");
}

at::Tensor StateValue::to_tensor() const {
  if (kind_ == Kind::kValue && value_.isTensor()) return value_.toTensor();
  throw std::runtime_error("checkpoint value is a " + value_.tagKind() + ", not a tensor");
}

c10::IValue StateValue::to_ivalue() const {
  switch (kind_) {
    case Kind::kModule: return module_state_dict(*module_);
    case Kind::kOptimizer: return optimizer_state_dict(*optimizer_);
    case Kind::kRng: return rng_.to_ivalue();
    case Kind::kNested: return state_to_ivalue(*nested_);
    case Kind::kValue: break;
  }
  if (value_.isTensor()) return value_.toTensor().detach();
  return value_;
}

c10::IValue state_to_ivalue(const State& state) {
  auto dict = new_dict();
  for (const auto& [key, value] : state) dict.insert(key, value.to_ivalue());
  return dict;
}

void atomic_write(const std::string& path, const std::vector<char>& bytes) {
  atomic_write(path, [&](const std::function<void(const char*, size_t)>& sink) {
    sink(bytes.data(), bytes.size());
  });
}

void atomic_write(const std::string& path,
                  const std::function<void(const std::function<void(const char*, size_t)>& sink)>&
                      produce) {
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  // Like Lightning's checkpoint IO, a missing parent directory is created.
  const auto slash = path.find_last_of('/');
  if (slash != std::string::npos && slash > 0) {
    try {
      fs::make_directories(path.substr(0, slash));
    } catch (const std::exception& e) {
      throw std::runtime_error("cannot create " + path + ": " + e.what());
    }
  }
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) fail("cannot create " + path + ": cannot create", tmp);
  auto abandon = [&](const char* what) {
    const int saved = errno;
    ::close(fd);
    fd = -1;  // closed once, whoever catches the error
    ::unlink(tmp.c_str());
    errno = saved;
    fail(std::string("cannot save ") + path + " (nothing was changed there): " + what, tmp);
  };
  // Write-behind: every kWriteBehind bytes the kernel is asked to start writing
  // the range out (sync_file_range, without waiting), so the disk works while the
  // rest is serialised and the final fsync only waits for the tail.
  constexpr off_t kWriteBehind = 32 << 20;
  off_t written = 0, started = 0;
  try {
    produce([&](const char* data, size_t size) {
      size_t done = 0;
      while (done < size) {
        const ssize_t n = ::write(fd, data + done, size - done);
        if (n < 0) {
          if (errno == EINTR) continue;
          abandon("cannot write");
        }
        done += static_cast<size_t>(n);
        written += n;
      }
      if (written - started >= kWriteBehind) {
        ::sync_file_range(fd, started, written - started, SYNC_FILE_RANGE_WRITE);  // a hint
        started = written;
      }
    });
  } catch (...) {
    if (fd >= 0) {
      ::close(fd);
      ::unlink(tmp.c_str());
    }
    throw;
  }
  if (::fsync(fd) != 0) abandon("cannot fsync");
  ::close(fd);
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int saved = errno;
    ::unlink(tmp.c_str());
    errno = saved;
    fail("cannot rename the temporary file onto", path);
  }
  const int dir = ::open(directory_of(path).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir >= 0) {
    ::fsync(dir);
    ::close(dir);
  }
}

c10::IValue read_checkpoint(const std::string& path, ReadMode mode) {
  struct stat info {};
  if (::stat(path.c_str(), &info) != 0) {
    // A sharded save interrupted between its fallback renames: the surviving copy.
    if (is_sharded_checkpoint(path)) return read_sharded_checkpoint(path);
    throw std::runtime_error("checkpoint not found: " + path);
  }
  if (S_ISDIR(info.st_mode)) {
    if (is_sharded_checkpoint(path)) return read_sharded_checkpoint(path);
    throw std::runtime_error("checkpoint " + path +
                             " is a directory without .metadata (nor the metadata.pt of torchfabric's earlier "
                             "layout), not a sharded checkpoint (a save that was interrupted leaves "
                             "<path>.partial, never <path>)");
  }
  {
    std::ifstream in(path, std::ios::binary);
    if (!in) fail("cannot open checkpoint", path);
    char magic[2] = {0, 0};
    in.read(magic, 2);
    if (static_cast<unsigned char>(magic[0]) == 0x80) {  // a pickle: torch.save's legacy format
      throw std::runtime_error(
          "file " + path +
          " is in torch.save's legacy (non-zip) format, which torchfabric does not read; "
          "convert it once in Python: torch.save(torch.load('" + path +
          "', weights_only=False), 'converted.pt')");
    }
    if (magic[0] != 'P' || magic[1] != 'K') {
      throw std::runtime_error("file " + path +
                               " is not a checkpoint (not a PyTorch zip archive)");
    }
  }
  auto corrupt = [&](const std::string& why) {
    return std::runtime_error("checkpoint " + path + " is truncated or corrupt (" +
                              std::to_string(info.st_size) + " bytes): " + why);
  };
  std::unique_ptr<caffe2::serialize::PyTorchStreamReader> reader;
  try {
    reader = std::make_unique<caffe2::serialize::PyTorchStreamReader>(path);
  } catch (const c10::Error& e) {
    throw corrupt(e.what_without_backtrace());
  } catch (const std::exception& e) {
    throw corrupt(e.what());
  }
  // Our reader first (fabric/pickle_reader.h): it reads what Python writes
  // (OrderedDict, Python objects as placeholders) and checks every length
  // before allocating. Tensors are rebuilt on the CPU whatever device they were
  // saved from (Lightning loads with map_location="cpu"): a file from a GPU
  // machine reads on a CPU machine, and ranks do not all materialise it on
  // cuda:0; load() copies each tensor to where its parameter lives.
  std::vector<std::string> notes;
  c10::IValue value;
  try {
    std::shared_ptr<const MappedFile> file;
    if (mode == ReadMode::kMapped) file = MappedFile::open(path);
    value = read_pickle_archive(*reader, "unpickling", &notes, file);
  } catch (const c10::Error& e) {
    throw corrupt(e.what_without_backtrace());
  } catch (const std::exception& e) {
    throw corrupt(e.what());
  }
  std::sort(notes.begin(), notes.end());
  notes.erase(std::unique(notes.begin(), notes.end()), notes.end());
  // A torch type our reader does not rebuild (say a quantized tensor): LibTorch's
  // unpickler may know it. The pickle has been read once already, so its
  // lengths are sound; the tensors LibTorch builds are checked against their
  // storage, which it does not do itself.
  const bool torch_type = std::any_of(notes.begin(), notes.end(), [](const std::string& cls) {
    return cls.rfind("torch.", 0) == 0;
  });
  if (torch_type) {
    try {
      auto libtorch = torch::jit::readArchiveAndTensors(
          "data", /*pickle_prefix=*/"", /*tensor_prefix=*/"", std::nullopt, std::nullopt,
          c10::Device(c10::DeviceType::CPU), *reader);
      if (!holds_none(libtorch)) {
        if (!tensors_in_bounds(libtorch)) throw corrupt("a tensor larger than its storage");
        return libtorch;
      }
    } catch (const c10::Error&) {
      // Keep our reading, with its placeholders and warnings.
    }
  }
  for (const auto& cls : notes) {
    TORCH_WARN("checkpoint ", path, " holds a Python ", cls,
               " object, which C++ reads as a dict {'__python_class__': '", cls,
               "', '__state__': ...}; to read it as plain values, save them in Python as "
               "such (e.g. vars(args) instead of an argparse.Namespace)");
  }
  return value;
}

void save_checkpoint(const std::string& path, const State& state) {
  const auto value = state_to_ivalue(state);
  atomic_write(path, [&](const std::function<void(const char*, size_t)>& sink) {
    serialize(value, sink);
  });
}

LoadResult load_checkpoint(const std::string& path, State& state, bool strict) {
  // Mapped: the load copies each tensor into its target straight from the file's
  // pages, so a model's weights are not held twice; what is handed back is copied.
  return load_checkpoint_value(read_checkpoint(path, ReadMode::kMapped), state, strict, path);
}

LoadResult load_checkpoint_value(const c10::IValue& loaded, State& state, bool strict,
                                 const std::string& path) {
  if (!loaded.isGenericDict()) {
    throw std::runtime_error("checkpoint " + path + " holds a " + loaded.tagKind() +
                             ", not a dict of named entries");
  }
  const auto dict = loaded.toGenericDict();
  if (strict) {
    // Check every key first, so a failed strict load changes nothing.
    std::vector<std::string> missing;
    for (const auto& [key, value] : state) {
      if (dict.find(key) == dict.end()) missing.push_back(key);
    }
    if (!missing.empty()) {
      std::string names;
      for (const auto& n : missing) names += (names.empty() ? "" : ", ") + ("'" + n + "'");
      std::string present;
      for (const auto& item : dict) {
        present += (present.empty() ? "" : ", ") + ("'" + item.key().toStringRef() + "'");
      }
      throw std::runtime_error("checkpoint " + path + " has no " + names + " (it holds " +
                               present + "); pass strict=false to load the rest");
    }
  }
  if (strict) {
    // Check every entry, nested ones and optimizers included, before changing
    // any: a failed strict load leaves the model, optimizer and RNG as they were.
    std::vector<std::string> problems;
    check_into(state, dict, "", problems);
    if (!problems.empty()) {
      std::string text;
      for (const auto& p : problems) text += (text.empty() ? "" : "; ") + p;
      throw std::runtime_error("cannot load " + path + " strictly (nothing was changed): " + text);
    }
  }
  LoadResult result;
  load_into(state, dict, strict, "", result);
  return result;
}

void load_raw(const std::string& path, torch::nn::Module& module, bool strict) {
  load_module_state_dict(module, read_checkpoint(path, ReadMode::kMapped), strict,
                         "module from " + path);
}

void load_raw(const std::string& path, torch::optim::Optimizer& optimizer) {
  load_optimizer_state_dict(optimizer, read_checkpoint(path, ReadMode::kMapped),
                            "optimizer from " + path);
}

}  // namespace fabric
