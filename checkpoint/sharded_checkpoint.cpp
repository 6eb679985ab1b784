#include "checkpoint/sharded_checkpoint.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <exception>
#include <map>
#include <set>
#include <stdexcept>
#include <unordered_map>

#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>

#include "checkpoint/dcp.h"
#include "checkpoint/filesystem.h"
#include "checkpoint/mapped_file.h"
#include "checkpoint/serialization.h"
#include "checkpoint/sharded_legacy.h"

namespace fabric {
namespace {

constexpr const char* kMeta = "meta.pt";  // Lightning's name for the rest of the state

// A rank's own part of the metadata, read by rank 0 and removed before publishing.
std::string part_file(int64_t rank) { return "__" + std::to_string(rank) + "_0.metadata"; }

using Path = std::vector<c10::IValue>;

// The optimizer state entries shaped like their parameter (Python's names), as
// opposed to scalars such as "step", which every rank holds whole.
using ShardOf = std::function<std::optional<ShardedJob::Shard>(const at::Tensor&)>;

// The ranges {first element, count} of the flattened whole that a rank's
// `numel` elements of a sharded tensor are, in order.
std::vector<std::pair<int64_t, int64_t>> ranges_of(const ShardedJob::Shard& shard, int64_t numel) {
  if (!shard.ranges.empty()) return shard.ranges;
  return {{shard.flat_offset, numel}};
}

bool per_element(const std::string& slot) {
  static const std::set<std::string> slots = {"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer",
                                              "square_avg", "grad_avg", "sum"};
  return slots.count(slot) > 0;
}

std::string dotted(const Path& path) {
  std::string out;
  for (const auto& part : path) {
    out += (out.empty() ? "" : ".") + (part.isString() ? part.toStringRef() : std::to_string(part.toInt()));
  }
  return out;
}

// What this rank writes: its items, and their entries in its part of the metadata.
struct Collector {
  const ShardedJob& job;
  dcp::ItemWriter& writer;
  dcp::Metadata& local;
  // Parameter (TensorImpl) -> its name in its module, for keying optimizer state.
  std::unordered_map<const void*, std::string> names;

  dcp::Entry& entry(const Path& path, const at::Tensor& like, const std::vector<int64_t>& size) {
    const auto fqn = dotted(path);
    local.planner_data[fqn] = path;
    auto& e = local.entries[fqn];
    e.tensor = true;
    e.dtype = like.scalar_type();
    e.size = size;
    return e;
  }
  // A tensor this rank holds `shard` of (flat, at its offset), or whole (rank 0 writes it).
  void tensor(const Path& path, const at::Tensor& t, const std::optional<ShardedJob::Shard>& shard) {
    if (!shard) {
      if (job.rank != 0) return;
      auto& e = entry(path, t, t.sizes().vec());
      e.chunks.push_back(dcp::Chunk{std::vector<int64_t>(t.dim(), 0), t.sizes().vec()});
      e.storage.push_back(writer.write(t));
      return;
    }
    if (!shard->owner) return;
    auto& e = entry(path, t, shard->full_shape);
    const at::Tensor flat = t.reshape({-1});
    int64_t at = 0;
    for (const auto& [first, count] : ranges_of(*shard, flat.numel())) {
      for (auto& chunk : dcp::chunks_of_range(shard->full_shape, first, first + count)) {
        const at::Tensor piece = flat.narrow(0, at, chunk.numel()).view(chunk.sizes);
        at += chunk.numel();
        e.storage.push_back(writer.write(piece));
        e.chunks.push_back(std::move(chunk));
      }
    }
  }
  void value(const Path& path, const c10::IValue& v) {
    if (job.rank != 0) return;
    const auto fqn = dotted(path);
    local.planner_data[fqn] = path;
    auto& e = local.entries[fqn];
    e.tensor = false;
    e.storage.assign(1, writer.write(v));
  }

  void module(const Path& path, const torch::nn::Module& m) {
    for (const auto& item : m.named_parameters()) {
      Path p = path;
      p.emplace_back(item.key());
      tensor(p, item.value(), job.shard_of(item.value()));
    }
    for (const auto& item : m.named_buffers()) {
      Path p = path;
      p.emplace_back(item.key());
      tensor(p, item.value(), std::nullopt);
    }
  }

  void optimizer(const Path& path, const torch::optim::Optimizer& opt) {
    const auto sd = optimizer_state_dict(opt).toGenericDict();
    std::vector<at::Tensor> params;  // in group order, as the state dict numbers them
    for (const auto& group : opt.param_groups()) {
      for (const auto& p : group.params()) params.push_back(p);
    }
    auto name = [&](int64_t index) {
      const auto it = names.find(params[static_cast<size_t>(index)].unsafeGetTensorImpl());
      return it == names.end() ? std::to_string(index) : it->second;
    };
    for (const auto& item : sd.at("state").toGenericDict()) {
      const int64_t index = item.key().toInt();
      const auto& param = params.at(static_cast<size_t>(index));
      const auto shard = job.shard_of(param);
      for (const auto& slot : item.value().toGenericDict()) {
        Path p = path;
        p.emplace_back(std::string("state"));
        p.emplace_back(name(index));
        p.emplace_back(slot.key());
        const auto& v = slot.value();
        if (!v.isTensor()) {
          value(p, v);
        } else if (shard && per_element(slot.key().toStringRef())) {  // split like its parameter
          tensor(p, v.toTensor(), shard);
        } else {
          tensor(p, v.toTensor(), std::nullopt);
        }
      }
    }
    const auto groups = sd.at("param_groups").toList();
    for (size_t g = 0; g < groups.size(); ++g) {
      for (const auto& item : groups.get(g).toGenericDict()) {
        Path p = path;
        p.emplace_back(std::string("param_groups"));
        p.emplace_back(static_cast<int64_t>(g));
        p.emplace_back(item.key());
        if (item.key().toStringRef() != "params") {
          value(p, item.value());
          continue;
        }
        c10::impl::GenericList ids(c10::AnyType::get());
        for (const auto& id : item.value().toListRef()) ids.push_back(name(id.toInt()));
        value(p, ids);
      }
    }
  }

  void walk(const State& state, const Path& prefix) {
    for (const auto& [key, v] : state) {
      Path path = prefix;
      path.emplace_back(key);
      switch (v.kind()) {
        case StateValue::Kind::kModule: module(path, *v.module()); break;
        case StateValue::Kind::kOptimizer: optimizer(path, *v.optimizer()); break;
        case StateValue::Kind::kNested: walk(v.nested(), path); break;
        default: break;
      }
    }
  }
};

// Parameter names for optimizer keys: a parameter's name in its module;
// qualified by the module's key where two modules of the state share a name.
void name_parameters(const State& state, const Path& prefix,
                     std::vector<std::pair<const void*, std::pair<std::string, std::string>>>& out) {
  for (const auto& [key, v] : state) {
    Path path = prefix;
    path.emplace_back(key);
    if (v.kind() == StateValue::Kind::kModule) {
      for (const auto& item : v.module()->named_parameters()) {
        out.push_back({item.value().unsafeGetTensorImpl(), {item.key(), dotted(path) + "." + item.key()}});
      }
    } else if (v.kind() == StateValue::Kind::kNested) {
      name_parameters(v.nested(), path, out);
    }
  }
}

// The optimizers anywhere in `state`.
void optimizers_in(const State& state, std::vector<const torch::optim::Optimizer*>& out) {
  for (const auto& [key, v] : state) {
    if (v.kind() == StateValue::Kind::kOptimizer) out.push_back(v.optimizer().get());
    if (v.kind() == StateValue::Kind::kNested) optimizers_in(v.nested(), out);
  }
}

// Also names an optimizer's stand-ins after the parameters they stand for.
std::unordered_map<const void*, std::string> parameter_names(
    const State& state, const std::function<at::Tensor(const at::Tensor&)>& stands_for) {
  std::vector<std::pair<const void*, std::pair<std::string, std::string>>> named;
  name_parameters(state, {}, named);
  std::map<std::string, int> uses;
  for (const auto& n : named) ++uses[n.second.first];
  std::unordered_map<const void*, std::string> names;
  for (const auto& n : named) names.emplace(n.first, uses[n.second.first] > 1 ? n.second.second : n.second.first);
  if (stands_for) {
    std::vector<const torch::optim::Optimizer*> optimizers;
    optimizers_in(state, optimizers);
    for (const auto* optimizer : optimizers) {
      for (const auto& group : optimizer->param_groups()) {
        for (const auto& p : group.params()) {
          if (names.count(p.unsafeGetTensorImpl())) continue;
          const auto param = stands_for(p);
          if (!param.defined()) continue;
          const auto it = names.find(param.unsafeGetTensorImpl());
          if (it != names.end()) names.emplace(p.unsafeGetTensorImpl(), it->second);
        }
      }
    }
  }
  return names;
}

// The state without its modules and optimizers (what meta.pt holds); nested
// maps left empty by that are dropped.
State rest_of(const State& state) {
  State out;
  for (const auto& [key, v] : state) {
    switch (v.kind()) {
      case StateValue::Kind::kModule:
      case StateValue::Kind::kOptimizer:
        break;
      case StateValue::Kind::kNested: {
        State nested = rest_of(v.nested());
        if (!nested.empty() || v.nested().empty()) out.emplace(key, StateValue(std::move(nested)));
        break;
      }
      default:
        out.emplace(key, v);
    }
  }
  return out;
}

// Rank 0: every rank's part into the directory's one .metadata.
dcp::Metadata merge_parts(const std::string& dir, int64_t world) {
  dcp::Metadata merged;
  for (int64_t r = 0; r < world; ++r) {
    const std::string path = fs::join(dir, part_file(r));
    const auto file = MappedFile::open(path);
    auto part = dcp::read_metadata(file->data(), file->size(), path, /*whole=*/false);
    for (auto& [fqn, entry] : part.entries) {
      auto it = merged.entries.find(fqn);
      if (it == merged.entries.end()) {
        merged.entries.emplace(fqn, std::move(entry));
        continue;
      }
      if (it->second.tensor != entry.tensor || it->second.size != entry.size || it->second.dtype != entry.dtype) {
        throw std::runtime_error("Fabric::save: ranks disagree on what '" + fqn + "' is (rank " +
                                 std::to_string(r) + " differs from an earlier rank)");
      }
      for (size_t i = 0; i < entry.chunks.size(); ++i) {
        it->second.chunks.push_back(std::move(entry.chunks[i]));
        it->second.storage.push_back(std::move(entry.storage[i]));
      }
    }
    for (auto& [fqn, path_of] : part.planner_data) merged.planner_data.emplace(fqn, std::move(path_of));
  }
  return merged;
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
  return fs::is_directory(dir) && (fs::exists(fs::join(dir, dcp::kMetadataFile)) ||
                                   fs::exists(fs::join(dir, legacy_sharded::kMetadataFile)));
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
  if (!job.shard_of || !job.any_rank_failed) {
    throw std::invalid_argument("save_sharded_checkpoint: the ShardedJob needs shard_of and any_rank_failed");
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
  try {
    dcp::ItemWriter writer(partial, dcp::data_file(rank));
    dcp::Metadata local;
    Collector collect{job, writer, local, parameter_names(state, job.stands_for)};
    collect.walk(state, {});
    writer.close();
    atomic_write(fs::join(partial, part_file(rank)), dcp::write_metadata(local));
    if (rank == 0) save_checkpoint(fs::join(partial, kMeta), rest_of(state));
  } catch (...) {
    error = std::current_exception();
  }
  try {
    agree(job, error, "write its part into " + partial);
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
      const auto metadata = merge_parts(partial, job.world_size);
      atomic_write(fs::join(partial, dcp::kMetadataFile), dcp::write_metadata(metadata));
      for (int64_t r = 0; r < job.world_size; ++r) {
        if (::unlink(fs::join(partial, part_file(r)).c_str()) != 0) {
          throw std::runtime_error("Fabric::save: cannot remove " + fs::join(partial, part_file(r)) + ": " +
                                   std::strerror(errno));
        }
      }
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
  return S_ISDIR(info.st_mode) && complete(path);
}

namespace {

// Puts what `extra` holds into `into`, dict into dict (meta.pt beside the DCP items).
void merge_into(c10::impl::GenericDict into, const c10::impl::GenericDict& extra) {
  for (const auto& item : extra) {
    auto it = into.find(item.key());
    if (it != into.end() && it->value().isGenericDict() && item.value().isGenericDict()) {
      merge_into(it->value().toGenericDict(), item.value().toGenericDict());
    } else {
      into.insert_or_assign(item.key(), item.value());
    }
  }
}

}  // namespace

namespace {

// The directory holding the newest complete copy of `path`.
std::string complete_copy(const std::string& path) {
  const std::string dir = fs::exists(path) ? path : surviving_copy(path);
  if (dir.empty()) throw std::runtime_error("checkpoint not found: " + path);
  return dir;
}

// The DCP items of `dir` as read by `leaf`, with meta.pt's entries beside them.
c10::IValue read_with_meta(const std::string& dir, const dcp::Reader& reader, const dcp::Reader::Leaf& leaf) {
  c10::IValue state = reader.state_dict(leaf);
  const std::string meta = fs::join(dir, kMeta);
  if (fs::exists(meta)) {
    const auto rest = read_checkpoint(meta);
    if (!rest.isGenericDict()) {
      throw std::runtime_error("sharded checkpoint " + dir + ": " + kMeta + " holds a " + rest.tagKind() +
                               ", not a dict");
    }
    merge_into(state.toGenericDict(), rest.toGenericDict());
  }
  return state;
}

// Where each of this rank's pieces lies in the checkpoint's flattened tensors:
// key -> the ranges of the flattened whole it is, and the shape this rank holds
// it in, for every sharded parameter of `state` and its per-element optimizer
// state. nullopt when an optimizer holds a sharded parameter that no module of
// the state names (its keys cannot be found).
struct Piece {
  std::vector<std::pair<int64_t, int64_t>> ranges;
  std::vector<int64_t> sizes;
};
std::optional<std::map<std::string, Piece>> pieces_of(
    const State& state, const Path& prefix, const ShardOf& shard_of, const dcp::Metadata& metadata,
    const std::unordered_map<const void*, std::string>& names) {
  std::map<std::string, Piece> out;
  for (const auto& [key, v] : state) {
    Path path = prefix;
    path.emplace_back(key);
    if (v.kind() == StateValue::Kind::kModule) {
      for (const auto& item : v.module()->named_parameters()) {
        const auto shard = shard_of(item.value());
        if (!shard) continue;
        Path p = path;
        p.emplace_back(item.key());
        const auto entry = metadata.entries.find(dotted(p));
        if (entry == metadata.entries.end() || entry->second.size != shard->full_shape) continue;  // reported by the load
        out[dotted(p)] = {ranges_of(*shard, item.value().numel()), item.value().sizes().vec()};
      }
    } else if (v.kind() == StateValue::Kind::kOptimizer) {
      for (const auto& group : v.optimizer()->param_groups()) {
        for (const auto& param : group.params()) {
          const auto shard = shard_of(param);
          if (!shard) continue;
          const auto name = names.find(param.unsafeGetTensorImpl());
          if (name == names.end()) return std::nullopt;
          Path p = path;
          p.emplace_back(std::string("state"));
          p.emplace_back(name->second);
          const std::string slots = dotted(p) + ".";
          for (auto it = metadata.entries.lower_bound(slots);
               it != metadata.entries.end() && it->first.compare(0, slots.size(), slots) == 0; ++it) {
            const auto slot = it->first.substr(slots.size());
            if (per_element(slot) && it->second.size == shard->full_shape) {
              out[it->first] = {ranges_of(*shard, param.numel()), param.sizes().vec()};
            }
          }
        }
      }
    } else if (v.kind() == StateValue::Kind::kNested) {
      auto nested = pieces_of(v.nested(), path, shard_of, metadata, names);
      if (!nested) return std::nullopt;
      out.insert(nested->begin(), nested->end());
    }
  }
  return out;
}

}  // namespace

c10::IValue read_sharded_checkpoint(const std::string& path) {
  const std::string dir = complete_copy(path);
  if (!fs::exists(fs::join(dir, dcp::kMetadataFile))) return legacy_sharded::read(dir);
  return read_with_meta(dir, dcp::Reader(dir), nullptr);
}

bool is_distributed_checkpoint(const std::string& path) {
  if (!is_sharded_checkpoint(path)) return false;
  return fs::exists(fs::join(complete_copy(path), dcp::kMetadataFile));
}

std::optional<c10::IValue> read_sharded_pieces(const std::string& path, const State& state,
                                               const ShardOf& shard_of,
                                               const std::function<at::Tensor(const at::Tensor&)>& stands_for) {
  const std::string dir = complete_copy(path);
  const dcp::Reader reader(dir);
  const auto pieces = pieces_of(state, {}, shard_of, reader.metadata(), parameter_names(state, stands_for));
  if (!pieces || pieces->empty()) return std::nullopt;
  return read_with_meta(dir, reader, [&](const std::string& fqn, const dcp::Entry& entry) -> c10::IValue {
    const auto piece = pieces->find(fqn);
    if (piece == pieces->end() || !entry.tensor) {
      return entry.tensor ? c10::IValue(reader.tensor(fqn)) : reader.value(fqn);
    }
    int64_t numel = 0;
    for (const auto& range : piece->second.ranges) numel += range.second;
    at::Tensor flat = at::empty({numel}, at::TensorOptions().dtype(entry.dtype));
    int64_t at = 0;
    for (const auto& [first, count] : piece->second.ranges) {
      at::Tensor part = flat.narrow(0, at, count);
      reader.read_flat(fqn, first, part);
      at += count;
    }
    return flat.view(piece->second.sizes);
  });
}

namespace {

// An optimizer state dict keyed by parameter name (a distributed checkpoint's)
// renumbered as torch.optim keys it: the names' positions in the param groups.
// Other dicts are searched for optimizers inside them.
void number_optimizers(c10::IValue& value) {
  if (!value.isGenericDict()) return;
  auto dict = value.toGenericDict();
  const auto state = dict.find("state");
  const auto groups = dict.find("param_groups");
  if (state != dict.end() && groups != dict.end() && state->value().isGenericDict() && groups->value().isList()) {
    std::map<std::string, int64_t> index;
    bool named = true;
    for (const auto& g : groups->value().toListRef()) {
      if (!g.isGenericDict() || !g.toGenericDict().contains("params")) return;
      const auto params = g.toGenericDict().at("params");
      if (!params.isList()) return;
      for (const auto& p : params.toListRef()) {
        if (!p.isString()) named = false;
        if (p.isString()) index.emplace(p.toStringRef(), static_cast<int64_t>(index.size()));
      }
    }
    if (!named) return;
    c10::impl::GenericDict numbered(c10::IntType::get(), c10::AnyType::get());
    for (const auto& item : state->value().toGenericDict()) {
      if (!item.key().isString() || !index.count(item.key().toStringRef())) return;  // not one of its params
      numbered.insert(index.at(item.key().toStringRef()), item.value());
    }
    for (const auto& g : groups->value().toListRef()) {
      c10::impl::GenericList ids(c10::AnyType::get());
      for (const auto& p : g.toGenericDict().at("params").toListRef()) ids.push_back(index.at(p.toStringRef()));
      g.toGenericDict().insert_or_assign("params", ids);
    }
    dict.insert_or_assign("state", numbered);
    return;
  }
  for (const auto& item : dict) {
    c10::IValue v = item.value();
    number_optimizers(v);
  }
}

}  // namespace

void consolidate_checkpoint(const std::string& dir, const std::string& file) {
  auto merged = read_sharded_checkpoint(dir);
  number_optimizers(merged);  // the file a full save writes (and torch.optim loads)
  atomic_write(file, [&](const std::function<void(const char*, size_t)>& sink) {
    serialize(merged, sink);
  });
}

}  // namespace fabric
