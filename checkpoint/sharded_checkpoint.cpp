#include "checkpoint/sharded_checkpoint.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <exception>
#include <stdexcept>

#include <ATen/ops/cat.h>
#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>

#include "checkpoint/filesystem.h"
#include "checkpoint/serialization.h"

namespace fabric {
namespace {

constexpr const char* kFormat = "torchfabric.sharded/1";
constexpr const char* kMetadata = "metadata.pt";

std::string shard_file(const std::string& dir, int64_t rank) {
  return fs::join(dir, "shard_" + std::to_string(rank) + ".pt");
}

// The optimizer state entries shaped like their parameter (split like it).
const std::vector<std::string>& per_element_slots() {
  static const std::vector<std::string> slots = {"exp_avg",         "exp_avg_sq", "max_exp_avg_sq",
                                                 "momentum_buffer", "square_avg", "grad_avg",
                                                 "sum"};
  return slots;
}

using Path = std::vector<c10::IValue>;

c10::impl::GenericList to_list(const Path& path) {
  c10::impl::GenericList list(c10::AnyType::get());
  for (const auto& part : path) list.push_back(part);
  return list;
}

std::string describe(const c10::impl::GenericList& path) {
  std::string out;
  for (size_t i = 0; i < path.size(); ++i) {
    const c10::IValue part = path.get(i);
    out += (out.empty() ? "" : "/") + (part.isString() ? part.toStringRef() : std::to_string(part.toInt()));
  }
  return out;
}

// Key paths and full shapes of the tensors in `state` that are per-rank pieces.
void collect_sharded(const State& state, const ShardedJob& job, const Path& prefix,
                     c10::impl::GenericList& out) {
  auto add = [&](Path path, const std::vector<int64_t>& shape) {
    c10::impl::GenericDict entry(c10::StringType::get(), c10::AnyType::get());
    entry.insert("path", to_list(path));
    entry.insert("shape", c10::IValue(shape));
    out.push_back(entry);
  };
  for (const auto& [key, value] : state) {
    Path path = prefix;
    path.emplace_back(key);
    switch (value.kind()) {
      case StateValue::Kind::kModule:
        for (const auto& item : value.module()->named_parameters()) {
          if (auto shape = job.full_shape(item.value())) {
            Path p = path;
            p.emplace_back(item.key());
            add(p, *shape);
          }
        }
        break;
      case StateValue::Kind::kOptimizer: {
        std::vector<at::Tensor> params;  // in group order, as the state dict numbers them
        for (const auto& group : value.optimizer()->param_groups()) {
          for (const auto& p : group.params()) params.push_back(p);
        }
        for (size_t index = 0; index < params.size(); ++index) {
          auto shape = job.full_shape(params[index]);
          if (!shape) continue;
          for (const auto& slot : per_element_slots()) {
            Path p = path;
            p.emplace_back("state");
            p.emplace_back(static_cast<int64_t>(index));
            p.emplace_back(slot);
            add(p, *shape);
          }
        }
        break;
      }
      case StateValue::Kind::kNested:
        collect_sharded(value.nested(), job, path, out);
        break;
      default:
        break;
    }
  }
}

// The dict holding the last component of `path` inside `root` (nullopt if absent).
std::optional<c10::impl::GenericDict> parent_of(const c10::IValue& root,
                                                const c10::impl::GenericList& path) {
  c10::IValue node = root;
  for (size_t i = 0; i + 1 < path.size(); ++i) {
    if (!node.isGenericDict()) return std::nullopt;
    auto dict = node.toGenericDict();
    auto it = dict.find(path.get(i));
    if (it == dict.end()) return std::nullopt;
    node = it->value();
  }
  if (!node.isGenericDict()) return std::nullopt;
  return node.toGenericDict();
}

// Every rank learns whether any rank failed (and rethrows its own error).
void agree(const ShardedJob& job, const std::exception_ptr& error, const std::string& what) {
  const bool failed = job.any_rank_failed(error != nullptr);
  if (error) std::rethrow_exception(error);
  if (failed) throw std::runtime_error("Fabric::save: another rank failed to " + what + " (its error names the cause)");
}

void rename_or_throw(const std::string& from, const std::string& to) {
  if (std::rename(from.c_str(), to.c_str()) != 0) {
    throw std::runtime_error("Fabric::save: cannot rename " + from + " to " + to + ": " +
                             std::strerror(errno));
  }
}

// Makes a directory's entries durable (a rename is durable once its parent is).
void sync_directory(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) {
    throw std::runtime_error("Fabric::save: cannot open directory " + path + " to sync it: " +
                             std::strerror(errno));
  }
  const int synced = ::fsync(fd);
  const int saved = errno;
  ::close(fd);
  if (synced != 0 && saved != EINVAL) {  // EINVAL: a file system that cannot sync directories
    throw std::runtime_error("Fabric::save: cannot sync directory " + path + ": " +
                             std::strerror(saved));
  }
}

std::string parent_directory(const std::string& path) {
  const auto slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

// A complete sharded checkpoint directory (its metadata is written last).
bool complete(const std::string& dir) {
  return fs::is_directory(dir) && fs::exists(fs::join(dir, kMetadata));
}

// Where the newest complete copy of `dir` is while `dir` itself is missing: a
// save interrupted between its renames (filesystems without RENAME_EXCHANGE)
// leaves the new copy at <dir>.partial and the previous one at <dir>.old.
std::string surviving_copy(const std::string& dir) {
  if (complete(dir + ".partial")) return dir + ".partial";
  if (complete(dir + ".old")) return dir + ".old";
  return "";
}

// Puts the complete `partial` at `dir`. Where `dir` exists, the two are swapped
// in one atomic step (renameat2 RENAME_EXCHANGE) and the previous checkpoint,
// now at `partial`, is removed after the swap is durable; no moment leaves no
// checkpoint at `dir`. Filesystems without the exchange get two renames
// through <dir>.old, and loads find the surviving copy (surviving_copy).
void publish(const std::string& partial, const std::string& dir) {
  const std::string parent = parent_directory(dir);
  sync_directory(partial);
  if (!fs::exists(dir)) {
    rename_or_throw(partial, dir);
    sync_directory(parent);
    return;
  }
  if (::renameat2(AT_FDCWD, partial.c_str(), AT_FDCWD, dir.c_str(), RENAME_EXCHANGE) == 0) {
    sync_directory(parent);
    fs::remove_all(partial);
    return;
  }
  if (errno != EINVAL && errno != ENOSYS && errno != EOPNOTSUPP) {
    throw std::runtime_error("Fabric::save: cannot swap " + partial + " with " + dir + ": " +
                             std::strerror(errno));
  }
  const std::string old = dir + ".old";
  fs::remove_all(old);
  rename_or_throw(dir, old);
  sync_directory(parent);
  rename_or_throw(partial, dir);
  sync_directory(parent);
  fs::remove_all(old);
}

// Before a save: a save interrupted between the fallback's renames left `dir`
// missing; put the newest complete copy back at `dir` first, so that clearing
// <dir>.partial never deletes it.
void recover(const std::string& dir) {
  if (fs::exists(dir)) return;
  const std::string copy = surviving_copy(dir);
  if (copy.empty()) return;
  rename_or_throw(copy, dir);
  sync_directory(parent_directory(dir));
}

}  // namespace

void save_sharded_checkpoint(const std::string& dir, const State& state, const ShardedJob& job) {
  if (!job.full_shape || !job.any_rank_failed) {
    throw std::invalid_argument("save_sharded_checkpoint: the ShardedJob needs full_shape and any_rank_failed");
  }
  const int64_t rank = job.rank;
  const std::string partial = dir + ".partial";
  std::exception_ptr error;
  if (rank == 0) {
    try {
      recover(dir);
      fs::remove_all(partial);  // left by an interrupted save (or the previous copy after a swap)
      fs::make_directories(partial);
    } catch (...) {
      error = std::current_exception();
    }
  }
  agree(job, error, "create " + partial);
  c10::impl::GenericList sharded(c10::AnyType::get());
  try {
    collect_sharded(state, job, {}, sharded);
    save_checkpoint(shard_file(partial, rank), state);
  } catch (...) {
    error = std::current_exception();
  }
  try {
    agree(job, error, "write its shard into " + partial);
  } catch (...) {
    if (rank == 0) {
      try {
        fs::remove_all(partial);
      } catch (...) {
      }
    }
    throw;
  }
  if (rank == 0) {
    try {
      c10::impl::GenericDict metadata(c10::StringType::get(), c10::AnyType::get());
      metadata.insert("format", std::string(kFormat));
      metadata.insert("world_size", job.world_size);
      metadata.insert("sharded", sharded);
      atomic_write(fs::join(partial, kMetadata), serialize(metadata));
      publish(partial, dir);
    } catch (...) {
      error = std::current_exception();
    }
  }
  agree(job, error, "finish " + dir);
}

bool is_sharded_checkpoint(const std::string& path) {
  struct stat info {};
  if (::stat(path.c_str(), &info) != 0) return !surviving_copy(path).empty();
  return S_ISDIR(info.st_mode) && fs::exists(fs::join(path, kMetadata));
}

c10::IValue read_sharded_checkpoint(const std::string& path) {
  const std::string dir = fs::exists(path) ? path : surviving_copy(path);
  if (dir.empty()) throw std::runtime_error("checkpoint not found: " + path);
  const auto meta_value = read_checkpoint(fs::join(dir, kMetadata));
  if (!meta_value.isGenericDict()) {
    throw std::runtime_error("sharded checkpoint " + dir + ": " + kMetadata + " is not a dict");
  }
  const auto meta = meta_value.toGenericDict();
  const auto format = meta.find("format");
  if (format == meta.end() || !format->value().isString() || format->value().toStringRef() != kFormat) {
    throw std::runtime_error("sharded checkpoint " + dir + ": " + kMetadata +
                             " is not torchfabric's (expected format '" + kFormat + "')");
  }
  const int64_t world = meta.at("world_size").toInt();
  std::vector<c10::IValue> ranks;
  for (int64_t r = 0; r < world; ++r) {
    const auto file = shard_file(dir, r);
    if (!fs::exists(file)) {
      throw std::runtime_error("sharded checkpoint " + dir + " was written by " +
                               std::to_string(world) + " ranks but " + file + " is missing");
    }
    ranks.push_back(read_checkpoint(file));
  }
  c10::IValue merged = ranks.front();
  for (const auto& entry_value : meta.at("sharded").toList()) {
    const auto entry = entry_value.get().toGenericDict();
    const auto path = entry.at("path").toList();
    std::vector<int64_t> shape;  // a list of ints, typed or not
    for (const auto& size : entry.at("shape").toListRef()) shape.push_back(size.toInt());
    auto parent = parent_of(merged, path);
    const auto last = path.get(path.size() - 1);
    if (!parent || parent->find(last) == parent->end()) continue;  // e.g. no such state slot
    std::vector<at::Tensor> pieces;
    int64_t total = 0;
    for (int64_t r = 0; r < world; ++r) {
      c10::IValue piece;
      if (auto p = parent_of(ranks[r], path)) {
        auto it = p->find(last);
        if (it != p->end()) piece = it->value();
      }
      if (!piece.isTensor()) {
        throw std::runtime_error("sharded checkpoint " + dir + ": " + shard_file(dir, r) +
                                 " lacks '" + describe(path) + "'");
      }
      pieces.push_back(piece.toTensor().reshape({-1}));
      total += pieces.back().numel();
    }
    int64_t expected = 1;
    for (auto d : shape) expected *= d;
    if (total != expected) {
      throw std::runtime_error("sharded checkpoint " + dir + " is damaged: the pieces of '" +
                               describe(path) + "' hold " + std::to_string(total) +
                               " elements, its shape needs " + std::to_string(expected));
    }
    parent->insert_or_assign(last, at::cat(pieces).view(shape));
  }
  return merged;
}

void consolidate_checkpoint(const std::string& dir, const std::string& file) {
  const auto merged = read_sharded_checkpoint(dir);
  atomic_write(file, [&](const std::function<void(const char*, size_t)>& sink) {
    serialize(merged, sink);
  });
}

}  // namespace fabric
