#include "checkpoint/pickle_values.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <unordered_map>

#include <ATen/ops/empty.h>

#include "checkpoint/pickle_reader.h"
#include "util/quoted_list.h"

namespace fabric {
namespace pickle_detail {

GenericDict new_dict() { return GenericDict(c10::AnyType::get(), c10::AnyType::get()); }

const char* const kGlobal = "\x01global:";
bool is_global(const c10::IValue& v) {
  return v.isString() && v.toStringRef().rfind(kGlobal, 0) == 0;
}
std::string global_name(const c10::IValue& v) { return v.toStringRef().substr(std::strlen(kGlobal)); }
c10::IValue make_global(const std::string& module, const std::string& name) {
  return std::string(kGlobal) + module + "." + name;
}

c10::ScalarType storage_dtype(const std::string& type) {
  static const std::map<std::string, c10::ScalarType> types = {
      {"FloatStorage", c10::kFloat},   {"DoubleStorage", c10::kDouble},
      {"HalfStorage", c10::kHalf},     {"BFloat16Storage", c10::kBFloat16},
      {"LongStorage", c10::kLong},     {"IntStorage", c10::kInt},
      {"ShortStorage", c10::kShort},   {"CharStorage", c10::kChar},
      {"ByteStorage", c10::kByte},     {"BoolStorage", c10::kBool},
      {"ComplexFloatStorage", c10::kComplexFloat}, {"ComplexDoubleStorage", c10::kComplexDouble},
      {"UntypedStorage", c10::kByte}};
  const auto dot = type.rfind('.');
  auto it = types.find(dot == std::string::npos ? type : type.substr(dot + 1));
  if (it == types.end()) throw PickleError("unknown storage type " + type);
  return it->second;
}

const void* container_of(const c10::IValue& v) {
  if (v.isList() || v.isGenericDict() || v.isTuple()) return v.internalToPointer();
  return nullptr;
}
namespace {
// The values directly inside a container (list items, dict keys and values,
// tuple elements).
void children_of(const c10::IValue& v, std::vector<c10::IValue>& out) {
  if (v.isList()) {
    for (const auto& item : v.toListRef()) out.push_back(item);
  } else if (v.isGenericDict()) {
    for (const auto& item : v.toGenericDict()) {
      out.push_back(item.key());
      out.push_back(item.value());
    }
  } else if (v.isTuple()) {
    for (const auto& item : v.toTupleRef().elements()) out.push_back(item);
  }
}

}  // namespace

// Why `root` cannot be returned (a container that contains itself, nesting
// deeper than kMaxNesting, or shared containers that expand to more than
// kMaxExpanded containers when walked as a tree, which every walk over a
// checkpoint does: 60 lists each holding the previous one twice are 2^60
// visits), or "" when it can; `seen` gets every container in it. Heights and
// expansions of shared containers are remembered, so sharing can hide neither
// depth nor size. Iterative: the value may be as deep as a forged file makes it.
constexpr int64_t kMaxExpanded = int64_t{1} << 22;
std::string nesting_problem(const c10::IValue& root, std::unordered_set<const void*>& seen) {
  struct Frame {
    std::vector<c10::IValue> children;
    size_t next = 0;
    const void* id;
    int64_t expanded = 1;  // containers, counting each visit of a shared one
    int64_t height = 1;    // levels of containers, this one included
  };
  std::unordered_set<const void*> on_path;
  std::unordered_map<const void*, int64_t> expanded_of, height_of;
  std::vector<Frame> path;
  int64_t root_expanded = 0;
  const std::string too_deep = "containers nested more than " + std::to_string(kMaxNesting) + " deep";
  // A finished child container of the frame on top (or of nobody: the root).
  const auto add = [&](int64_t expanded, int64_t height) {
    if (path.empty()) {
      root_expanded = expanded;
      return;
    }
    auto& parent = path.back();
    parent.expanded = std::min(kMaxExpanded + 1, parent.expanded + expanded);
    parent.height = std::max(parent.height, height + 1);
  };
  const auto enter = [&](const c10::IValue& v) -> std::string {
    const void* id = container_of(v);
    if (!id) return "";
    if (on_path.count(id)) return "a container that contains itself";
    if (!seen.insert(id).second) {  // checked already (shared, not a cycle)
      add(expanded_of[id], height_of[id]);
      if (!path.empty() && static_cast<int64_t>(path.size()) - 1 + path.back().height > kMaxNesting) {
        return too_deep;
      }
      return "";
    }
    if (static_cast<int64_t>(path.size()) >= kMaxNesting) return too_deep;
    Frame frame{{}, 0, id};
    children_of(v, frame.children);
    on_path.insert(id);
    path.push_back(std::move(frame));
    return "";
  };
  if (auto why = enter(root); !why.empty()) return why;
  while (!path.empty()) {
    auto& frame = path.back();
    if (frame.next == frame.children.size()) {
      const int64_t expanded = frame.expanded, height = frame.height;
      expanded_of[frame.id] = expanded;
      height_of[frame.id] = height;
      on_path.erase(frame.id);
      path.pop_back();
      if (static_cast<int64_t>(path.size()) + height > kMaxNesting) return too_deep;
      add(expanded, height);
      if (std::max(expanded, root_expanded) > kMaxExpanded) {
        return "shared containers that expand to more than " + std::to_string(kMaxExpanded) +
               " containers";
      }
      continue;
    }
    const c10::IValue child = frame.children[frame.next++];
    if (auto why = enter(child); !why.empty()) return why;
  }
  return "";
}

// (A 100 000-deep or self-containing value destroyed recursively would
// overflow the stack, or leak.)
void dismantle(std::vector<c10::IValue> work, const std::unordered_set<const void*>& keep) {
  std::unordered_set<const void*> done;
  while (!work.empty()) {
    c10::IValue v = std::move(work.back());
    work.pop_back();
    const void* id = container_of(v);
    if (!id || keep.count(id) || !done.insert(id).second) continue;
    children_of(v, work);
    if (v.isList()) {
      v.toList().clear();
    } else if (v.isGenericDict()) {
      v.toGenericDict().clear();
    } else {
      auto& tuple = *v.toTuple();
      for (size_t i = 0; i < tuple.size(); ++i) tuple.unsafeSetElement(i, c10::IValue());
    }
  }
}

std::vector<c10::IValue> elements(const c10::IValue& args) {
  if (args.isTuple()) return args.toTupleRef().elements().vec();
  if (args.isList()) return args.toList().vec();
  return {};
}

namespace {

// The dtype a _rebuild_tensor_v3 names (the global torch.<name>).
c10::ScalarType tensor_dtype(const c10::IValue& value) {
  static const std::unordered_map<std::string, c10::ScalarType> dtypes = {
      {"torch.float32", c10::kFloat},       {"torch.float64", c10::kDouble},
      {"torch.float16", c10::kHalf},        {"torch.bfloat16", c10::kBFloat16},
      {"torch.int8", c10::kChar},           {"torch.int16", c10::kShort},
      {"torch.int32", c10::kInt},           {"torch.int64", c10::kLong},
      {"torch.uint8", c10::kByte},          {"torch.bool", c10::kBool},
      {"torch.uint16", c10::kUInt16},       {"torch.uint32", c10::kUInt32},
      {"torch.uint64", c10::kUInt64},       {"torch.complex64", c10::kComplexFloat},
      {"torch.complex128", c10::kComplexDouble},
      {"torch.float8_e4m3fn", c10::ScalarType::Float8_e4m3fn},
      {"torch.float8_e5m2", c10::ScalarType::Float8_e5m2},
      {"torch.float8_e4m3fnuz", c10::ScalarType::Float8_e4m3fnuz},
      {"torch.float8_e5m2fnuz", c10::ScalarType::Float8_e5m2fnuz},
      {"torch.float8_e8m0fnu", c10::ScalarType::Float8_e8m0fnu}};
  const std::string name = is_global(value) ? global_name(value)
                           : value.isString() ? value.toStringRef()
                                              : std::string("a ") + value.tagKind();
  auto it = dtypes.find(name);
  if (it == dtypes.end()) {
    std::vector<std::string> names;
    for (const auto& item : dtypes) names.push_back(item.first);
    std::sort(names.begin(), names.end());
    throw PickleError("a tensor of dtype " + name + ", which this reader does not support (it reads " +
                      quoted_list(names) + ")");
  }
  return it->second;
}

}  // namespace

std::optional<c10::IValue> call_global(const std::string& name, const std::vector<c10::IValue>& a) {
  if (name == "torch._utils._rebuild_tensor_v2" || name == "torch._utils._rebuild_tensor" ||
      name == "torch._utils._rebuild_tensor_v3") {
    if (a.size() < 4 || !a[0].isTensor()) throw PickleError("a malformed " + name);
    const auto& storage = a[0].toTensor();
    const auto sizes = elements(a[2]), strides = elements(a[3]);
    if (sizes.size() != strides.size() || !a[1].isInt()) throw PickleError("a malformed " + name);
    std::vector<int64_t> size, stride;
    for (const auto& s : sizes) size.push_back(s.isInt() ? s.toInt() : -1);
    for (const auto& s : strides) stride.push_back(s.isInt() ? s.toInt() : -1);
    const int64_t offset = a[1].toInt();
    // v3 (dtypes without a typed storage class: uint16/32/64, the float8s)
    // names the dtype; its storage is untyped bytes.
    c10::ScalarType dtype = storage.scalar_type();
    if (name == "torch._utils._rebuild_tensor_v3" && a.size() >= 7) dtype = tensor_dtype(a[6]);
    const int64_t item = static_cast<int64_t>(c10::elementSize(dtype));
    const int64_t nbytes = static_cast<int64_t>(storage.storage().nbytes());
    if (nbytes % item != 0) {
      throw PickleError("a storage of " + std::to_string(nbytes) + " bytes read as " +
           std::string(c10::toString(dtype)) + " (" + std::to_string(item) + "-byte elements)");
    }
    const auto problem = tensor_extent_problem(offset, size, stride, nbytes / item);
    if (!problem.empty()) throw PickleError(problem);
    at::Tensor t = at::empty({0}, storage.options().dtype(dtype));
    t.set_(storage.storage(), offset, size, stride);
    return t;
  }
  if (name == "torch._utils._rebuild_parameter" ||
      name == "torch._utils._rebuild_parameter_with_state") {
    if (a.empty() || !a[0].isTensor()) throw PickleError("a malformed " + name);
    return a[0];
  }
  if (name == "collections.OrderedDict" || name == "builtins.dict") {
    auto dict = new_dict();
    if (!a.empty()) {
      for (const auto& pair : elements(a[0])) {
        const auto kv = elements(pair);
        if (kv.size() == 2) dict.insert_or_assign(kv[0], kv[1]);
      }
    }
    return dict;
  }
  if (name == "torch.Size" || name == "builtins.tuple") {
    return a.empty() ? c10::IValue(c10::ivalue::Tuple::create({}))
                     : c10::IValue(c10::ivalue::Tuple::create(elements(a[0])));
  }
  if (name == "builtins.set" || name == "builtins.frozenset" || name == "builtins.list") {
    GenericList list(c10::AnyType::get());
    if (!a.empty()) {
      for (const auto& item : elements(a[0])) list.push_back(item);
    }
    return list;
  }
  if (name == "torch.device") {
    std::string device = a.empty() ? "cpu" : a[0].toStringRef();
    if (a.size() > 1 && a[1].isInt()) device += ":" + std::to_string(a[1].toInt());
    return device;
  }
  if (name == "builtins.getattr" && a.size() == 2 && is_global(a[0]) && a[1].isString()) {
    return global_name(a[0]) + "." + a[1].toStringRef();
  }
  if (name == "torch.jit._pickle.restore_type_tag" && !a.empty()) return a[0];
  if ((name == "torch.jit._pickle.build_intlist" || name == "torch.jit._pickle.build_doublelist" ||
       name == "torch.jit._pickle.build_boollist" || name == "torch.jit._pickle.build_tensorlist") &&
      !a.empty()) {
    return a[0];  // LibTorch's typed lists, written by torch::pickle_save
  }
  if (name == "_codecs.encode" && !a.empty()) return a[0];  // bytes written by protocol 2
  return std::nullopt;
}

namespace {
// c10 dicts hash only strings, numbers and the like, so an object key becomes
// a string: the marker, then its class and fields in a small tagged encoding.
constexpr const char* kObjectKey = "\x01object-key:";

void encode(const c10::IValue& v, std::string& out) {
  if (v.isString()) {
    out += "s" + std::to_string(v.toStringRef().size()) + ":" + v.toStringRef();
  } else if (v.isInt()) {
    out += "i" + std::to_string(v.toInt()) + ";";
  } else if (v.isBool()) {
    out += v.toBool() ? "T" : "F";
  } else if (v.isNone()) {
    out += "N";
  } else if (v.isDouble()) {
    char buf[40];
    std::snprintf(buf, sizeof(buf), "%a", v.toDouble());
    out += std::string("d") + buf + ";";
  } else if (v.isTuple()) {
    const auto& items = v.toTupleRef().elements();
    out += "t" + std::to_string(items.size()) + ":";
    for (const auto& item : items) encode(item, out);
  } else {
    throw PickleError(std::string("a dict key that is an object holding a ") + v.tagKind());
  }
}

struct Decoder {
  const std::string& s;
  size_t pos;
  // Throws std::invalid_argument or std::out_of_range on a malformed key (a
  // forged file can hold any string that starts like one of ours).
  int64_t number(char end) {
    const size_t stop = s.find(end, pos);
    if (stop == std::string::npos) throw std::invalid_argument("unterminated number");
    const int64_t n = std::stoll(s.substr(pos, stop - pos));
    pos = stop + 1;
    return n;
  }
  size_t count(char end) {
    const int64_t n = number(end);
    if (n < 0 || static_cast<size_t>(n) > s.size() - pos) throw std::out_of_range("a count past the end");
    return static_cast<size_t>(n);
  }
  c10::IValue next() {
    const char tag = s.at(pos++);
    switch (tag) {
      case 's': {
        const auto n = count(':');
        std::string text = s.substr(pos, n);
        pos += n;
        return text;
      }
      case 'i': return number(';');
      case 'T': return true;
      case 'F': return false;
      case 'N': return c10::IValue();
      case 'd': {
        const size_t stop = s.find(';', pos);
        if (stop == std::string::npos) throw std::invalid_argument("unterminated number");
        const double d = std::strtod(s.substr(pos, stop - pos).c_str(), nullptr);
        pos = stop + 1;
        return d;
      }
      default: {  // 't'
        if (tag != 't') throw std::invalid_argument("an unknown tag");
        const auto n = count(':');
        std::vector<c10::IValue> items;
        for (size_t i = 0; i < n; ++i) items.push_back(next());
        return c10::ivalue::Tuple::create(std::move(items));
      }
    }
  }
};
}  // namespace

c10::IValue object_key(const c10::IValue& placeholder) {
  if (!placeholder.isGenericDict()) throw PickleError("a dict key that is a list");
  const auto dict = placeholder.toGenericDict();
  const auto cls = dict.find("__python_class__");
  if (cls == dict.end() || !cls->value().isString()) throw PickleError("a dict key that is a dict");
  std::string key = kObjectKey;
  encode(cls->value(), key);
  const auto state = dict.find("__state__");
  if (state != dict.end() && state->value().isGenericDict()) {
    const auto fields = state->value().toGenericDict();
    key += "t" + std::to_string(fields.size()) + ":";
    for (const auto& item : fields) {
      if (!item.key().isString()) throw PickleError("a dict key that is an object with a field not named by a string");
      encode(c10::ivalue::Tuple::create({item.key(), item.value()}), key);
    }
  } else if (state != dict.end() && !state->value().isNone()) {
    throw PickleError("a dict key that is a " + cls->value().toStringRef() + " with a state that is not a dict");
  } else {
    key += "t0:";
  }
  return key;
}

std::optional<std::vector<std::pair<std::string, c10::IValue>>> object_key_fields(const c10::IValue& key) {
  if (!key.isString() || key.toStringRef().rfind(kObjectKey, 0) != 0) return std::nullopt;
  std::vector<std::pair<std::string, c10::IValue>> out;
  try {
    Decoder d{key.toStringRef(), std::strlen(kObjectKey)};
    d.next();  // the class
    const auto fields = d.next();
    if (!fields.isTuple()) return std::nullopt;
    for (const auto& field : fields.toTupleRef().elements()) {
      if (!field.isTuple() || field.toTupleRef().elements().size() != 2) return std::nullopt;
      const auto& kv = field.toTupleRef().elements();
      if (!kv[0].isString()) return std::nullopt;
      out.emplace_back(kv[0].toStringRef(), kv[1]);
    }
  } catch (const std::exception&) {
    return std::nullopt;
  }
  return out;
}

void name_globals(c10::IValue& value) {
  if (value.isGenericDict()) {
    auto dict = value.toGenericDict();
    for (const auto& item : dict) {
      auto v = item.value();
      if (is_global(v)) {
        item.setValue(global_name(v));
      } else {
        name_globals(v);
      }
    }
  } else if (value.isList()) {
    auto list = value.toList();
    for (size_t i = 0; i < list.size(); ++i) {
      c10::IValue v = list.get(i);
      if (is_global(v)) {
        list.set(i, global_name(v));
      } else {
        name_globals(v);
      }
    }
  }
}

}  // namespace pickle_detail

std::string tensor_extent_problem(int64_t offset, at::IntArrayRef sizes, at::IntArrayRef strides,
                                  int64_t storage_numel) {
  if (sizes.size() != strides.size()) return "a tensor with more sizes than strides";
  bool empty = false;
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (sizes[i] < 0 || strides[i] < 0) return "a tensor with a negative size or stride";
    if (sizes[i] == 0) empty = true;
  }
  if (offset < 0) return "a tensor with a negative storage offset";
  if (empty) return "";
  // The last element's index, computed without overflow: a forged size or stride
  // must not wrap around into a small, "valid" extent.
  int64_t last = offset;
  for (size_t i = 0; i < sizes.size(); ++i) {
    int64_t step = 0;
    if (__builtin_mul_overflow(sizes[i] - 1, strides[i], &step) ||
        __builtin_add_overflow(last, step, &last)) {
      return "a tensor whose sizes and strides overflow";
    }
  }
  if (last >= storage_numel) return "a tensor larger than its storage";
  return "";
}

}  // namespace fabric
