#include "checkpoint/sharded_legacy.h"

#include <optional>
#include <stdexcept>
#include <vector>

#include <ATen/ops/cat.h>

#include "checkpoint/checkpoint.h"
#include "checkpoint/filesystem.h"

namespace fabric::legacy_sharded {

const char* const kMetadataFile = "metadata.pt";

namespace {

constexpr const char* kFormat = "torchfabric.sharded/1";

std::string shard_file(const std::string& dir, int64_t rank) {
  return fs::join(dir, "shard_" + std::to_string(rank) + ".pt");
}

std::string describe(const c10::impl::GenericList& path) {
  std::string out;
  for (size_t i = 0; i < path.size(); ++i) {
    const c10::IValue part = path.get(i);
    out += (out.empty() ? "" : "/") + (part.isString() ? part.toStringRef() : std::to_string(part.toInt()));
  }
  return out;
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

}  // namespace

c10::IValue read(const std::string& dir) {
  const auto meta_value = read_checkpoint(fs::join(dir, kMetadataFile));
  if (!meta_value.isGenericDict()) {
    throw std::runtime_error("sharded checkpoint " + dir + ": " + kMetadataFile + " is not a dict");
  }
  const auto meta = meta_value.toGenericDict();
  const auto format = meta.find("format");
  if (format == meta.end() || !format->value().isString() || format->value().toStringRef() != kFormat) {
    throw std::runtime_error("sharded checkpoint " + dir + ": " + kMetadataFile +
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

}  // namespace fabric::legacy_sharded
