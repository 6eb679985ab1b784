#include "checkpoint/dcp_metadata.h"

#include <cstring>
#include <stdexcept>

#include "checkpoint/pickle_reader.h"
#include "checkpoint/pickle_values.h"

namespace fabric::dcp {

const char* const kVersion = "1.0.0";

int64_t Chunk::numel() const {
  int64_t n = 1;
  for (auto s : sizes) n *= s;
  return n;
}

namespace {

constexpr const char* kMetadataModule = "torch.distributed.checkpoint.metadata";

const std::vector<std::pair<c10::ScalarType, const char*>>& dtype_names() {
  static const std::vector<std::pair<c10::ScalarType, const char*>> names = {
      {c10::kFloat, "float32"},       {c10::kDouble, "float64"},     {c10::kHalf, "float16"},
      {c10::kBFloat16, "bfloat16"},   {c10::kLong, "int64"},         {c10::kInt, "int32"},
      {c10::kShort, "int16"},         {c10::kChar, "int8"},          {c10::kByte, "uint8"},
      {c10::kBool, "bool"},           {c10::kComplexFloat, "complex64"},
      {c10::kComplexDouble, "complex128"},
      {c10::ScalarType::Float8_e4m3fn, "float8_e4m3fn"},
      {c10::ScalarType::Float8_e5m2, "float8_e5m2"}};
  return names;
}

// Protocol-2 opcodes, written by hand: only what a Metadata needs.
class Pickle {
 public:
  Pickle() { out_ = {'\x80', '\x02'}; }
  void op(char c) { out_.push_back(c); }
  void global(const std::string& module, const std::string& name) {
    op('c');
    append(module + "\n" + name + "\n");
  }
  void str(const std::string& s) {
    op('X');
    const auto n = static_cast<uint32_t>(s.size());
    append(std::string(reinterpret_cast<const char*>(&n), 4));
    append(s);
  }
  void integer(int64_t v) {
    if (v >= INT32_MIN && v <= INT32_MAX) {
      op('J');
      const auto i = static_cast<int32_t>(v);
      append(std::string(reinterpret_cast<const char*>(&i), 4));
    } else {
      op('\x8a');  // LONG1: 8 little-endian two's-complement bytes
      op('\x08');
      append(std::string(reinterpret_cast<const char*>(&v), 8));
    }
  }
  void none() { op('N'); }
  void boolean(bool b) { op(b ? '\x88' : '\x89'); }
  void mark() { op('('); }
  // torch.Size((a, b, ...))
  void size(const std::vector<int64_t>& dims) {
    global("torch", "Size");
    mark();
    mark();
    for (auto d : dims) integer(d);
    op('t');
    op('t');
    op('R');
  }
  // cls.__new__(cls), then (build) its __dict__ from the MARK'ed key/value pairs.
  void object(const std::string& module, const std::string& cls) {
    global(module, cls);
    op(')');
    op('\x81');  // NEWOBJ
  }
  void begin_state() {
    op('}');
    mark();
  }
  void end_state() {
    op('u');  // SETITEMS
    op('b');  // BUILD
  }
  std::vector<char> finish() {
    op('.');
    return std::move(out_);
  }

 private:
  void append(const std::string& s) { out_.insert(out_.end(), s.begin(), s.end()); }
  std::vector<char> out_;
};

void write_entry(Pickle& p, const Entry& entry) {
  if (!entry.tensor) {
    p.object(kMetadataModule, "BytesStorageMetadata");
    return;
  }
  p.object(kMetadataModule, "TensorStorageMetadata");
  p.begin_state();
  p.str("properties");
  p.object(kMetadataModule, "TensorProperties");
  p.mark();  // its __getstate__: (dtype, layout, requires_grad, memory format, pin_memory)
  p.global("torch", dtype_name(entry.dtype));
  p.global("torch.serialization", "_get_layout");
  p.mark();
  p.str("torch.strided");
  p.op('t');
  p.op('R');
  p.boolean(entry.requires_grad);
  p.global(kMetadataModule, "_MEM_FORMAT_ENCODING");
  p.mark();
  p.integer(0);  // TORCH_CONTIGUOUS_FORMAT
  p.op('t');
  p.op('R');
  p.boolean(false);
  p.op('t');
  p.op('b');
  p.str("size");
  p.size(entry.size);
  p.str("chunks");
  p.op(']');
  p.mark();
  for (const auto& chunk : entry.chunks) {
    p.object(kMetadataModule, "ChunkStorageMetadata");
    p.begin_state();
    p.str("offsets");
    p.size(chunk.offsets);
    p.str("sizes");
    p.size(chunk.sizes);
    p.end_state();
  }
  p.op('e');  // APPENDS
  p.end_state();
}

void write_index(Pickle& p, const std::string& fqn, const Entry& entry, size_t chunk) {
  p.object(kMetadataModule, "MetadataIndex");
  p.begin_state();
  p.str("fqn");
  p.str(fqn);
  p.str("offset");
  if (entry.tensor) {
    p.size(entry.chunks[chunk].offsets);
  } else {
    p.none();
  }
  p.str("index");
  if (entry.tensor) {
    p.integer(static_cast<int64_t>(chunk));
  } else {
    p.none();
  }
  p.end_state();
  const auto& info = entry.storage.at(chunk);
  p.object("torch.distributed.checkpoint.filesystem", "_StorageInfo");
  p.begin_state();
  p.str("relative_path");
  p.str(info.relative_path);
  p.str("offset");
  p.integer(info.offset);
  p.str("length");
  p.integer(info.length);
  p.end_state();
}

// Reading: the pickle machine's placeholders ({"__python_class__": ..., "__state__": ...}).
class Reader {
 public:
  explicit Reader(std::string what) : what_(std::move(what)) {}
  [[noreturn]] void fail(const std::string& why) const {
    throw std::runtime_error("distributed checkpoint metadata " + what_ + ": " + why);
  }
  // The __state__ of a placeholder of class `cls` (module.name).
  c10::IValue state_of(const c10::IValue& v, const std::string& cls, const std::string& where) const {
    if (!v.isGenericDict()) fail(where + " is a " + v.tagKind() + ", not a " + cls);
    const auto dict = v.toGenericDict();
    const auto c = dict.find("__python_class__");
    if (c == dict.end() || !c->value().isString() || c->value().toStringRef() != cls) {
      fail(where + " is not a " + cls);
    }
    const auto s = dict.find("__state__");
    return s == dict.end() ? c10::IValue() : s->value();
  }
  bool is_class(const c10::IValue& v, const std::string& cls) const {
    if (!v.isGenericDict()) return false;
    const auto dict = v.toGenericDict();
    const auto c = dict.find("__python_class__");
    return c != dict.end() && c->value().isString() && c->value().toStringRef() == cls;
  }
  c10::IValue field(const c10::IValue& state, const std::string& name, const std::string& where) const {
    if (!state.isGenericDict()) fail(where + " has no fields");
    const auto dict = state.toGenericDict();
    const auto it = dict.find(name);
    if (it == dict.end()) fail(where + " has no '" + name + "'");
    return it->value();
  }
  std::vector<int64_t> ints(const c10::IValue& v, const std::string& where) const {
    std::vector<int64_t> out;
    if (!v.isTuple() && !v.isList()) fail(where + " is a " + v.tagKind() + ", not a torch.Size");
    for (const auto& item : pickle_detail::elements(v)) {
      if (!item.isInt()) fail(where + " holds a " + std::string(item.tagKind()) + ", not an int");
      out.push_back(item.toInt());
    }
    return out;
  }
  std::string text(const c10::IValue& v, const std::string& where) const {
    if (!v.isString()) fail(where + " is a " + v.tagKind() + ", not a string");
    return v.toStringRef();
  }
  int64_t integer(const c10::IValue& v, const std::string& where) const {
    if (!v.isInt()) fail(where + " is a " + v.tagKind() + ", not an int");
    return v.toInt();
  }

 private:
  std::string what_;
};

std::string describe(const std::vector<int64_t>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

Entry read_entry(const Reader& r, const std::string& fqn, const c10::IValue& v, bool whole) {
  Entry entry;
  const std::string where = "'" + fqn + "'";
  if (r.is_class(v, std::string(kMetadataModule) + ".BytesStorageMetadata")) {
    entry.tensor = false;
    return entry;
  }
  const auto state = r.state_of(v, std::string(kMetadataModule) + ".TensorStorageMetadata", where);
  const auto props = r.state_of(r.field(state, "properties", where),
                                std::string(kMetadataModule) + ".TensorProperties", where + "'s properties");
  c10::IValue dtype;
  if (props.isTuple() && !pickle_detail::elements(props).empty()) {
    const auto items = pickle_detail::elements(props);
    dtype = items[0];
    if (items.size() > 2 && items[2].isBool()) entry.requires_grad = items[2].toBool();
  } else {
    dtype = r.field(props, "dtype", where + "'s properties");
  }
  std::string name = dtype.isString() ? dtype.toStringRef() : "";
  if (pickle_detail::is_global(dtype)) name = pickle_detail::global_name(dtype);
  if (name.rfind("torch.", 0) == 0) name = name.substr(6);
  const auto parsed = dtype_from_name(name);
  if (!parsed) r.fail(where + " has dtype '" + name + "', which torchfabric does not read");
  entry.dtype = *parsed;
  entry.size = r.ints(r.field(state, "size", where), where + "'s size");
  const auto chunks = r.field(state, "chunks", where);
  if (!chunks.isList()) r.fail(where + "'s chunks are a " + chunks.tagKind() + ", not a list");
  int64_t numel = 1, covered = 0;
  for (auto d : entry.size) {
    if (d < 0 || __builtin_mul_overflow(numel, d, &numel)) r.fail(where + " has size " + describe(entry.size));
  }
  for (const auto& c : chunks.toListRef()) {
    const auto cs = r.state_of(c, std::string(kMetadataModule) + ".ChunkStorageMetadata", where + "'s chunk");
    Chunk chunk{r.ints(r.field(cs, "offsets", where), where + "'s chunk offsets"),
                r.ints(r.field(cs, "sizes", where), where + "'s chunk sizes")};
    bool inside = chunk.offsets.size() == entry.size.size() && chunk.sizes.size() == entry.size.size();
    for (size_t d = 0; inside && d < entry.size.size(); ++d) {
      inside = chunk.offsets[d] >= 0 && chunk.sizes[d] >= 0 && chunk.offsets[d] <= entry.size[d] &&
               chunk.sizes[d] <= entry.size[d] - chunk.offsets[d];
    }
    if (!inside) {
      r.fail(where + " of size " + describe(entry.size) + " has a chunk at " + describe(chunk.offsets) +
             " of size " + describe(chunk.sizes) + " outside it");
    }
    covered += chunk.numel();
    entry.chunks.push_back(std::move(chunk));
  }
  // Chunks inside the tensor that do not overlap and add up to it cover it.
  const size_t n = entry.chunks.size();
  for (size_t a = 0; n <= 4096 && a < n; ++a) {
    for (size_t b = a + 1; b < n; ++b) {
      bool overlap = entry.chunks[a].numel() > 0 && entry.chunks[b].numel() > 0;
      for (size_t d = 0; overlap && d < entry.size.size(); ++d) {
        const auto& x = entry.chunks[a];
        const auto& y = entry.chunks[b];
        overlap = x.offsets[d] < y.offsets[d] + y.sizes[d] && y.offsets[d] < x.offsets[d] + x.sizes[d];
      }
      if (overlap) {
        r.fail(where + " has overlapping chunks at " + describe(entry.chunks[a].offsets) + " and " +
               describe(entry.chunks[b].offsets));
      }
    }
  }
  if (whole && covered != numel) {
    r.fail("the chunks of " + where + " hold " + std::to_string(covered) + " of its " +
           std::to_string(numel) + " elements (size " + describe(entry.size) + ")");
  }
  entry.storage.resize(n);
  return entry;
}

}  // namespace

std::string dtype_name(c10::ScalarType dtype) {
  for (const auto& [type, name] : dtype_names()) {
    if (type == dtype) return name;
  }
  throw std::invalid_argument(std::string("a distributed checkpoint cannot hold a tensor of dtype ") +
                              c10::toString(dtype));
}

std::optional<c10::ScalarType> dtype_from_name(const std::string& name) {
  for (const auto& [type, n] : dtype_names()) {
    if (name == n) return type;
  }
  return std::nullopt;
}

std::vector<char> write_metadata(const Metadata& metadata) {
  Pickle p;
  p.object(kMetadataModule, "Metadata");
  p.begin_state();
  p.str("state_dict_metadata");
  p.op('}');
  p.mark();
  for (const auto& [fqn, entry] : metadata.entries) {
    p.str(fqn);
    write_entry(p, entry);
  }
  p.op('u');
  p.str("planner_data");
  p.op('}');
  p.mark();
  for (const auto& [fqn, path] : metadata.planner_data) {
    p.str(fqn);
    p.mark();
    for (const auto& part : path) {
      if (part.isInt()) {
        p.integer(part.toInt());
      } else {
        p.str(part.toStringRef());
      }
    }
    p.op('t');
  }
  p.op('u');
  p.str("storage_data");
  p.op('}');
  p.mark();
  for (const auto& [fqn, entry] : metadata.entries) {
    const size_t items = entry.tensor ? entry.chunks.size() : 1;
    if (entry.storage.size() != items) {
      throw std::invalid_argument("dcp::write_metadata: '" + fqn + "' has " + std::to_string(items) +
                                  " item(s) but " + std::to_string(entry.storage.size()) + " storage record(s)");
    }
    for (size_t i = 0; i < items; ++i) write_index(p, fqn, entry, i);
  }
  p.op('u');
  p.str("storage_meta");
  p.none();
  p.str("version");
  p.str(kVersion);
  p.end_state();
  return p.finish();
}

Metadata read_metadata(const char* data, size_t size, const std::string& what, bool whole) {
  const Reader r(what);
  const c10::IValue root = read_pickle(data, size, what);
  const auto state = r.state_of(root, std::string(kMetadataModule) + ".Metadata", "the file");
  if (!state.isGenericDict()) r.fail("its Metadata has no fields");
  const auto fields = state.toGenericDict();
  const auto version = fields.find("version");
  if (version != fields.end() && !version->value().isNone() &&
      (!version->value().isString() || version->value().toStringRef() != kVersion)) {
    r.fail("version " + (version->value().isString() ? "'" + version->value().toStringRef() + "'"
                                                       : std::string("a ") + version->value().tagKind()) +
           " is not one torchfabric reads (it reads '" + kVersion +
           "', written by torch 2.4 to 2.11, and the unversioned files of earlier ones)");
  }
  Metadata out;
  const auto sdm = r.field(state, "state_dict_metadata", "its Metadata");
  if (!sdm.isGenericDict()) r.fail("state_dict_metadata is a " + sdm.tagKind() + ", not a dict");
  for (const auto& item : sdm.toGenericDict()) {
    const auto fqn = r.text(item.key(), "a key of state_dict_metadata");
    out.entries.emplace(fqn, read_entry(r, fqn, item.value(), whole));
  }
  const auto planner = fields.find("planner_data");
  if (planner != fields.end() && planner->value().isGenericDict()) {
    for (const auto& item : planner->value().toGenericDict()) {
      if (!item.key().isString()) continue;
      std::vector<c10::IValue> path;
      for (const auto& part : pickle_detail::elements(item.value())) {
        if (!part.isString() && !part.isInt()) r.fail("planner_data of '" + item.key().toStringRef() + "' is malformed");
        path.push_back(part);
      }
      if (!path.empty()) out.planner_data.emplace(item.key().toStringRef(), std::move(path));
    }
  }
  const auto storage = r.field(state, "storage_data", "its Metadata");
  if (!storage.isGenericDict()) r.fail("storage_data is a " + storage.tagKind() + ", not a dict");
  for (const auto& item : storage.toGenericDict()) {
    // A MetadataIndex as a key reads as (marker, class, ((field, value), ...)).
    const auto key = pickle_detail::object_key_fields(item.key());
    if (!key) r.fail("a key of storage_data is not a MetadataIndex");
    const auto find = [&](const char* name) -> c10::IValue {
      for (const auto& [k, v] : *key) {
        if (k == name) return v;
      }
      return c10::IValue();
    };
    const auto fqn = r.text(find("fqn"), "a MetadataIndex's fqn");
    const auto entry = out.entries.find(fqn);
    if (entry == out.entries.end()) r.fail("storage_data names '" + fqn + "', which state_dict_metadata does not");
    const auto info = r.state_of(item.value(), "torch.distributed.checkpoint.filesystem._StorageInfo",
                                 "the storage of '" + fqn + "'");
    StorageInfo where{r.text(r.field(info, "relative_path", fqn), "relative_path of '" + fqn + "'"),
                      r.integer(r.field(info, "offset", fqn), "offset of '" + fqn + "'"),
                      r.integer(r.field(info, "length", fqn), "length of '" + fqn + "'")};
    if (info.isGenericDict()) {
      const auto transforms = info.toGenericDict().find("transform_descriptors");
      if (transforms != info.toGenericDict().end() && !transforms->value().isNone() &&
          !(transforms->value().isList() && transforms->value().toListRef().empty())) {
        r.fail("'" + fqn + "' is stored through transforms (compression), which torchfabric does not read; "
               "save without a storage extension");
      }
    }
    if (where.offset < 0 || where.length < 0 || where.relative_path.empty() ||
        where.relative_path.find('/') != std::string::npos || where.relative_path[0] == '.') {
      r.fail("the storage of '" + fqn + "' is malformed (file '" + where.relative_path + "', offset " +
             std::to_string(where.offset) + ", length " + std::to_string(where.length) + ")");
    }
    if (!entry->second.tensor) {
      entry->second.storage.assign(1, where);
      continue;
    }
    const auto offset = r.ints(find("offset"), "the chunk offset of '" + fqn + "'");
    bool matched = false;
    for (size_t i = 0; i < entry->second.chunks.size() && !matched; ++i) {
      if (entry->second.chunks[i].offsets == offset) {
        entry->second.storage[i] = where;
        matched = true;
      }
    }
    if (!matched) r.fail("storage_data names a chunk of '" + fqn + "' at " + describe(offset) + " that it does not have");
  }
  for (const auto& [fqn, entry] : out.entries) {
    if (!entry.tensor && entry.storage.empty()) r.fail("storage_data has no item for '" + fqn + "'");
    for (size_t i = 0; entry.tensor && i < entry.chunks.size(); ++i) {
      if (entry.storage[i].relative_path.empty()) {
        r.fail("storage_data has no item for the chunk of '" + fqn + "' at " + describe(entry.chunks[i].offsets));
      }
    }
  }
  return out;
}

}  // namespace fabric::dcp
