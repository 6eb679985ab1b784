#include "checkpoint/dcp.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <stdexcept>

#include <ATen/ops/empty.h>
#include <caffe2/serialize/inline_container.h>
#include <caffe2/serialize/read_adapter_interface.h>
#include <torch/csrc/autograd/grad_mode.h>

#include "checkpoint/filesystem.h"
#include "checkpoint/mapped_file.h"
#include "checkpoint/pickle_reader.h"
#include "checkpoint/serialization.h"

namespace fabric::dcp {

const char* const kMetadataFile = ".metadata";

std::string data_file(int64_t rank) { return "__" + std::to_string(rank) + "_0.distcp"; }

namespace {

constexpr int64_t kAlignment = 64;

std::string describe(const std::vector<int64_t>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

// Elements [begin, end) of the sub-tensor shape[dim:], whose leading indices are `prefix`.
void boxes(const std::vector<int64_t>& shape, size_t dim, int64_t begin, int64_t end,
           std::vector<int64_t> prefix, std::vector<Chunk>& out) {
  if (begin >= end) return;
  auto chunk = [&](int64_t first, int64_t count, bool whole_rest) {
    Chunk c;
    c.offsets = prefix;
    c.sizes.assign(prefix.size(), 1);
    c.offsets.push_back(first);
    c.sizes.push_back(count);
    for (size_t d = dim + 1; d < shape.size(); ++d) {
      c.offsets.push_back(0);
      c.sizes.push_back(whole_rest ? shape[d] : 1);
    }
    out.push_back(std::move(c));
  };
  if (dim + 1 == shape.size()) {
    chunk(begin, end - begin, true);
    return;
  }
  int64_t inner = 1;
  for (size_t d = dim + 1; d < shape.size(); ++d) inner *= shape[d];
  if (begin % inner != 0) {  // a partial first row
    const int64_t row = begin / inner;
    auto p = prefix;
    p.push_back(row);
    boxes(shape, dim + 1, begin - row * inner, std::min(end, (row + 1) * inner) - row * inner, p, out);
    begin = (row + 1) * inner;
    if (begin >= end) return;
  }
  if (end / inner > begin / inner) chunk(begin / inner, end / inner - begin / inner, true);
  if (end % inner != 0) {  // a partial last row
    auto p = prefix;
    p.push_back(end / inner);
    boxes(shape, dim + 1, 0, end % inner, p, out);
  }
}

class MemoryAdapter : public caffe2::serialize::ReadAdapterInterface {
 public:
  MemoryAdapter(const char* data, size_t size) : data_(data), size_(size) {}
  size_t size() const override { return size_; }
  size_t read(uint64_t pos, void* buf, size_t n, const char* /*what*/) const override {
    if (pos >= size_) return 0;
    n = std::min<size_t>(n, size_ - pos);
    std::memcpy(buf, data_ + pos, n);
    return n;
  }

 private:
  const char* data_;
  size_t size_;
};

}  // namespace

std::vector<Chunk> chunks_of_range(const std::vector<int64_t>& shape, int64_t begin, int64_t end) {
  std::vector<Chunk> out;
  if (begin >= end) return out;
  if (shape.empty()) {
    out.push_back(Chunk{});
    return out;
  }
  boxes(shape, 0, begin, end, {}, out);
  return out;
}

ItemWriter::ItemWriter(const std::string& dir, const std::string& name)
    : path_(fs::join(dir, name)), name_(name) {
  fd_ = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd_ < 0) throw std::runtime_error("Fabric::save: cannot create " + path_ + ": " + std::strerror(errno));
}

ItemWriter::~ItemWriter() {
  if (fd_ >= 0) ::close(fd_);
}

void ItemWriter::put(const char* data, size_t size) {
  while (size > 0) {
    const ssize_t n = ::write(fd_, data, size);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) throw std::runtime_error("Fabric::save: cannot write " + path_ + ": " + std::strerror(errno));
    data += n;
    size -= static_cast<size_t>(n);
    written_ += n;
  }
}

StorageInfo ItemWriter::write(const c10::IValue& value) {
  if (fd_ < 0) throw std::logic_error("dcp::ItemWriter: write after close");
  static const char zeros[kAlignment] = {};
  if (written_ % kAlignment != 0) put(zeros, static_cast<size_t>(kAlignment - written_ % kAlignment));
  StorageInfo info{name_, written_, 0};
  c10::IValue item = value;
  if (value.isTensor()) {  // only its elements: a view's archive would hold its whole storage
    torch::NoGradGuard no_grad;
    const auto& t = value.toTensor();
    item = t.detach().to(at::kCPU).contiguous().clone();
  }
  serialize(item, [&](const char* data, size_t size) { put(data, size); });
  info.length = written_ - info.offset;
  return info;
}

void ItemWriter::close() {
  if (fd_ < 0) return;
  const int fd = fd_;
  fd_ = -1;
  if (::fsync(fd) != 0) {
    const int error = errno;
    ::close(fd);
    throw std::runtime_error("Fabric::save: cannot fsync " + path_ + ": " + std::strerror(error));
  }
  if (::close(fd) != 0) throw std::runtime_error("Fabric::save: cannot close " + path_ + ": " + std::strerror(errno));
}

Reader::Reader(std::string dir) : dir_(std::move(dir)) {
  const std::string path = fs::join(dir_, kMetadataFile);
  if (!fs::exists(path)) {
    throw std::runtime_error("distributed checkpoint " + dir_ + " has no " + kMetadataFile +
                             " (a save that was interrupted, or not a checkpoint directory)");
  }
  const auto file = MappedFile::open(path);
  metadata_ = read_metadata(file->data(), file->size(), path);
}

c10::IValue Reader::item(const std::string& fqn, const StorageInfo& where) const {
  auto& file = files_[where.relative_path];
  const std::string path = fs::join(dir_, where.relative_path);
  if (!file) {
    if (!fs::exists(path)) {
      throw std::runtime_error("distributed checkpoint " + dir_ + ": its " + kMetadataFile + " names " +
                               where.relative_path + " (for '" + fqn + "'), which is not there");
    }
    file = MappedFile::open(path);
  }
  const auto end = static_cast<uint64_t>(where.offset) + static_cast<uint64_t>(where.length);
  if (end > file->size()) {
    throw std::runtime_error("distributed checkpoint " + path + " is truncated: '" + fqn + "' lies at bytes [" +
                             std::to_string(where.offset) + ", " + std::to_string(end) + ") but the file holds " +
                             std::to_string(file->size()));
  }
  const auto part = file->slice(static_cast<size_t>(where.offset), static_cast<size_t>(where.length));
  const std::string what = "distributed checkpoint " + path + ": the item of '" + fqn + "' at byte " +
                           std::to_string(where.offset);
  try {
    caffe2::serialize::PyTorchStreamReader reader(std::make_shared<MemoryAdapter>(part->data(), part->size()));
    return read_pickle_archive(reader, what, nullptr, part);
  } catch (const c10::Error& e) {
    throw std::runtime_error(what + " is not a torch.save archive: " + e.what_without_backtrace());
  }
}

at::Tensor Reader::tensor(const std::string& fqn) const {
  const auto it = metadata_.entries.find(fqn);
  if (it == metadata_.entries.end() || !it->second.tensor) {
    throw std::runtime_error("distributed checkpoint " + dir_ + " holds no tensor '" + fqn + "'");
  }
  at::Tensor out = at::empty(it->second.size, at::TensorOptions().dtype(it->second.dtype));
  read_into(fqn, std::vector<int64_t>(it->second.size.size(), 0), out);
  return out;
}

void Reader::read_into(const std::string& fqn, const std::vector<int64_t>& offsets, at::Tensor& out) const {
  const auto it = metadata_.entries.find(fqn);
  if (it == metadata_.entries.end() || !it->second.tensor) {
    throw std::runtime_error("distributed checkpoint " + dir_ + " holds no tensor '" + fqn + "'");
  }
  const Entry& entry = it->second;
  const size_t ndim = entry.size.size();
  if (offsets.size() != ndim || static_cast<size_t>(out.dim()) != ndim) {
    throw std::runtime_error("distributed checkpoint " + dir_ + ": '" + fqn + "' has " + std::to_string(ndim) +
                             " dimension(s), the target " + std::to_string(out.dim()));
  }
  torch::NoGradGuard no_grad;
  for (size_t c = 0; c < entry.chunks.size(); ++c) {
    const Chunk& chunk = entry.chunks[c];
    std::vector<int64_t> lo(ndim), hi(ndim);
    bool overlap = chunk.numel() > 0;
    for (size_t d = 0; overlap && d < ndim; ++d) {
      lo[d] = std::max(offsets[d], chunk.offsets[d]);
      hi[d] = std::min(offsets[d] + out.size(static_cast<int64_t>(d)), chunk.offsets[d] + chunk.sizes[d]);
      overlap = lo[d] < hi[d];
    }
    if (!overlap) continue;
    const auto value = item(fqn, entry.storage[c]);
    if (!value.isTensor()) {
      throw std::runtime_error("distributed checkpoint " + dir_ + ": the item of '" + fqn + "' at " +
                               describe(chunk.offsets) + " is a " + value.tagKind() + ", not a tensor");
    }
    const at::Tensor stored = value.toTensor();
    if (stored.sizes().vec() != chunk.sizes || stored.scalar_type() != entry.dtype) {
      throw std::runtime_error("distributed checkpoint " + dir_ + ": the chunk of '" + fqn + "' at " +
                               describe(chunk.offsets) + " should be " + describe(chunk.sizes) + " " +
                               dtype_name(entry.dtype) + " but its item is " + describe(stored.sizes().vec()) +
                               " " + c10::toString(stored.scalar_type()));
    }
    at::Tensor src = stored, dst = out;
    for (size_t d = 0; d < ndim; ++d) {
      const auto dd = static_cast<int64_t>(d);
      src = src.narrow(dd, lo[d] - chunk.offsets[d], hi[d] - lo[d]);
      dst = dst.narrow(dd, lo[d] - offsets[d], hi[d] - lo[d]);
    }
    dst.copy_(src);
  }
}

void Reader::read_flat(const std::string& fqn, int64_t flat_offset, at::Tensor& flat) const {
  const auto it = metadata_.entries.find(fqn);
  if (it == metadata_.entries.end() || !it->second.tensor) {
    throw std::runtime_error("distributed checkpoint " + dir_ + " holds no tensor '" + fqn + "'");
  }
  int64_t numel = 1;
  for (auto d : it->second.size) numel *= d;
  if (flat.dim() == 1 && flat.numel() == 0) return;  // an empty piece (a rank that holds none of it)
  if (flat.dim() != 1 || flat_offset < 0 || flat_offset + flat.numel() > numel) {
    throw std::runtime_error("distributed checkpoint " + dir_ + ": elements [" + std::to_string(flat_offset) +
                             ", " + std::to_string(flat_offset + flat.numel()) + ") are not inside '" + fqn +
                             "' of size " + describe(it->second.size));
  }
  int64_t at = 0;
  for (const auto& box : chunks_of_range(it->second.size, flat_offset, flat_offset + flat.numel())) {
    at::Tensor region = flat.narrow(0, at, box.numel()).view(box.sizes);
    read_into(fqn, box.offsets, region);
    at += box.numel();
  }
}

c10::IValue Reader::value(const std::string& fqn) const {
  const auto it = metadata_.entries.find(fqn);
  if (it == metadata_.entries.end() || it->second.tensor) {
    throw std::runtime_error("distributed checkpoint " + dir_ + " holds no value '" + fqn + "'");
  }
  return item(fqn, it->second.storage.at(0));
}

namespace {

// The nesting being rebuilt: dict keys (strings) and list indices (ints).
struct Node {
  std::vector<std::pair<std::string, Node>> keys;  // in the order met
  std::map<int64_t, Node> items;
  c10::IValue leaf;
  bool is_leaf = false;
  Node& child(const c10::IValue& part) {
    if (part.isInt()) return items[part.toInt()];
    for (auto& kv : keys) {
      if (kv.first == part.toStringRef()) return kv.second;
    }
    keys.emplace_back(part.toStringRef(), Node{});
    return keys.back().second;
  }
};

c10::IValue build(Node& node, const std::string& where, const std::string& dir) {
  if (node.is_leaf) {
    if (!node.keys.empty() || !node.items.empty()) {
      throw std::runtime_error("distributed checkpoint " + dir + ": '" + where + "' is both a value and a container");
    }
    return node.leaf;
  }
  if (!node.items.empty()) {
    if (!node.keys.empty()) {
      throw std::runtime_error("distributed checkpoint " + dir + ": '" + where + "' mixes list items and dict keys");
    }
    c10::impl::GenericList list(c10::AnyType::get());
    int64_t next = 0;
    for (auto& [index, child] : node.items) {
      if (index != next++) {
        throw std::runtime_error("distributed checkpoint " + dir + ": the list '" + where + "' lacks item " +
                                 std::to_string(next - 1));
      }
      list.push_back(build(child, where + "." + std::to_string(index), dir));
    }
    return list;
  }
  c10::impl::GenericDict dict(c10::StringType::get(), c10::AnyType::get());
  for (auto& [key, child] : node.keys) dict.insert(key, build(child, where.empty() ? key : where + "." + key, dir));
  return dict;
}

}  // namespace

c10::IValue Reader::state_dict(const Leaf& leaf) const {
  Node root;
  for (const auto& [fqn, entry] : metadata_.entries) {
    const auto path = metadata_.planner_data.find(fqn);
    Node* node = &root;
    if (path == metadata_.planner_data.end()) {
      node = &root.child(fqn);
    } else {
      for (const auto& part : path->second) node = &node->child(part);
    }
    node->leaf = leaf ? leaf(fqn, entry) : entry.tensor ? c10::IValue(tensor(fqn)) : value(fqn);
    node->is_leaf = true;
  }
  return build(root, "", dir_);
}

}  // namespace fabric::dcp
