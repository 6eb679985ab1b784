#include "fabric/pickle_reader.h"

#include "fabric/mapped_file.h"

#include <cstdint>
#include <cstring>
#include <map>
#include <stdexcept>
#include <unordered_map>

#include <ATen/ops/empty.h>
#include <c10/core/Storage.h>
#include <caffe2/serialize/inline_container.h>

namespace fabric {
namespace {

using GenericDict = c10::impl::GenericDict;
using GenericList = c10::impl::GenericList;

GenericDict new_dict() { return GenericDict(c10::AnyType::get(), c10::AnyType::get()); }

// A Python global (a class or function) on the stack: "module.name".
constexpr const char* kGlobal = "\x01global:";
bool is_global(const c10::IValue& v) {
  return v.isString() && v.toStringRef().rfind(kGlobal, 0) == 0;
}
std::string global_name(const c10::IValue& v) { return v.toStringRef().substr(std::strlen(kGlobal)); }

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
  if (it == types.end()) throw std::runtime_error("unknown storage type " + type);
  return it->second;
}

class Machine {
 public:
  Machine(caffe2::serialize::PyTorchStreamReader& reader, std::string what,
          std::vector<std::string>* notes, std::shared_ptr<const MappedFile> file)
      : reader_(reader), what_(std::move(what)), notes_(notes), file_(std::move(file)) {}

  c10::IValue run(const char* data, size_t size) {
    data_ = data;
    size_ = size;
    pos_ = 0;
    while (true) {
      const uint8_t op = byte();
      switch (op) {
        case 0x80: byte(); break;                      // PROTO
        case 0x95: bytes(8); break;                    // FRAME
        case '.': return pop();                        // STOP
        case '(': marks_.push_back(stack_.size()); break;  // MARK
        case 'N': stack_.emplace_back(); break;        // NONE
        case 0x88: stack_.emplace_back(true); break;   // NEWTRUE
        case 0x89: stack_.emplace_back(false); break;  // NEWFALSE
        case 'J': stack_.emplace_back(static_cast<int64_t>(le<int32_t>())); break;  // BININT
        case 'K': stack_.emplace_back(static_cast<int64_t>(le<uint8_t>())); break;  // BININT1
        case 'M': stack_.emplace_back(static_cast<int64_t>(le<uint16_t>())); break; // BININT2
        case 0x8a: stack_.emplace_back(long_int(le<uint8_t>())); break;             // LONG1
        case 0x8b: stack_.emplace_back(long_int(le<uint32_t>())); break;            // LONG4
        case 'I': stack_.emplace_back(text_int(line())); break;                     // INT
        case 'L': stack_.emplace_back(text_int(line())); break;                     // LONG
        case 'G': {                                                                  // BINFLOAT
          uint64_t bits = 0;
          for (int i = 0; i < 8; ++i) bits = (bits << 8) | byte();
          double d;
          std::memcpy(&d, &bits, 8);
          stack_.emplace_back(d);
          break;
        }
        case 'X': stack_.emplace_back(bytes(le<uint32_t>())); break;        // BINUNICODE
        case 0x8c: stack_.emplace_back(bytes(le<uint8_t>())); break;        // SHORT_BINUNICODE
        case 0x8d: stack_.emplace_back(bytes(le<uint64_t>())); break;       // BINUNICODE8
        case 'T': stack_.emplace_back(bytes(le<uint32_t>())); break;        // BINSTRING
        case 'U': stack_.emplace_back(bytes(le<uint8_t>())); break;         // SHORT_BINSTRING
        case 'B': stack_.emplace_back(bytes(le<uint32_t>())); break;        // BINBYTES
        case 'C': stack_.emplace_back(bytes(le<uint8_t>())); break;         // SHORT_BINBYTES
        case 0x8e: stack_.emplace_back(bytes(le<uint64_t>())); break;       // BINBYTES8
        case 0x96: stack_.emplace_back(bytes(le<uint64_t>())); break;       // BYTEARRAY8
        case '}': stack_.emplace_back(new_dict()); break;                   // EMPTY_DICT
        case ']': stack_.emplace_back(GenericList(c10::AnyType::get())); break;  // EMPTY_LIST
        case 0x8f: stack_.emplace_back(GenericList(c10::AnyType::get())); break; // EMPTY_SET
        case ')': stack_.emplace_back(c10::ivalue::Tuple::create({})); break;    // EMPTY_TUPLE
        case 0x85: tuple(1); break;                                         // TUPLE1
        case 0x86: tuple(2); break;                                         // TUPLE2
        case 0x87: tuple(3); break;                                         // TUPLE3
        case 't': tuple(stack_.size() - pop_mark()); break;                 // TUPLE
        case 'l':                                                           // LIST
        case 0x91: {                                                        // FROZENSET
          const size_t start = pop_mark();
          GenericList list(c10::AnyType::get());
          for (size_t i = start; i < stack_.size(); ++i) list.push_back(stack_[i]);
          stack_.resize(start);
          stack_.emplace_back(list);
          break;
        }
        case 'd': {                                                         // DICT
          const size_t start = pop_mark();
          auto dict = new_dict();
          for (size_t i = start; i + 1 < stack_.size(); i += 2) dict.insert_or_assign(stack_[i], stack_[i + 1]);
          stack_.resize(start);
          stack_.emplace_back(dict);
          break;
        }
        case 'a': {                                                         // APPEND
          auto value = pop();
          append(top(), {value});
          break;
        }
        case 'e':                                                           // APPENDS
        case 0x90: {                                                        // ADDITEMS
          const size_t start = pop_mark();
          std::vector<c10::IValue> items(stack_.begin() + static_cast<std::ptrdiff_t>(start), stack_.end());
          stack_.resize(start);
          append(top(), items);
          break;
        }
        case 's': {                                                         // SETITEM
          auto value = pop();
          auto key = pop();
          set_items(top(), {key, value});
          break;
        }
        case 'u': {                                                         // SETITEMS
          const size_t start = pop_mark();
          std::vector<c10::IValue> items(stack_.begin() + static_cast<std::ptrdiff_t>(start), stack_.end());
          stack_.resize(start);
          set_items(top(), items);
          break;
        }
        case '0': pop(); break;                                             // POP
        case '1': stack_.resize(pop_mark()); break;                         // POP_MARK
        case '2': stack_.push_back(top()); break;                           // DUP
        case 'q': memo_[le<uint8_t>()] = top(); break;                      // BINPUT
        case 'r': memo_[le<uint32_t>()] = top(); break;                     // LONG_BINPUT
        case 0x94: memo_[static_cast<uint32_t>(memo_.size())] = top(); break;  // MEMOIZE
        case 'p': memo_[static_cast<uint32_t>(std::stoul(line()))] = top(); break;  // PUT
        case 'h': stack_.push_back(get_memo(le<uint8_t>())); break;         // BINGET
        case 'j': stack_.push_back(get_memo(le<uint32_t>())); break;        // LONG_BINGET
        case 'g': stack_.push_back(get_memo(static_cast<uint32_t>(std::stoul(line())))); break;  // GET
        case 'c': {                                                         // GLOBAL
          const auto module = line();
          const auto name = line();
          stack_.emplace_back(std::string(kGlobal) + module + "." + name);
          break;
        }
        case 0x93: {                                                        // STACK_GLOBAL
          const auto name = pop().toStringRef();
          const auto module = pop().toStringRef();
          stack_.emplace_back(std::string(kGlobal) + module + "." + name);
          break;
        }
        case 'R': {                                                         // REDUCE
          auto args = pop();
          auto callable = pop();
          stack_.push_back(call(callable, args));
          break;
        }
        case 0x81: {                                                        // NEWOBJ
          auto args = pop();
          auto cls = pop();
          stack_.push_back(call(cls, args));
          break;
        }
        case 0x92: {                                                        // NEWOBJ_EX
          pop();  // kwargs
          auto args = pop();
          auto cls = pop();
          stack_.push_back(call(cls, args));
          break;
        }
        case 'b': {                                                         // BUILD
          auto state = pop();
          build(top(), state);
          break;
        }
        case 'Q': {                                                         // BINPERSID
          auto pid = pop();
          stack_.push_back(persistent_load(pid));
          break;
        }
        default: {
          char hex[8];
          std::snprintf(hex, sizeof(hex), "0x%02x", op);
          fail(std::string("unsupported pickle opcode ") + hex);
        }
      }
    }
  }

 private:
  [[noreturn]] void fail(const std::string& why) const {
    throw std::runtime_error(what_ + ": " + why + " at byte " + std::to_string(pos_) + " of data.pkl");
  }
  uint8_t byte() {
    if (pos_ >= size_) fail("the pickle ends early");
    return static_cast<uint8_t>(data_[pos_++]);
  }
  std::string bytes(uint64_t n) {
    if (n > size_ - pos_) fail("a value runs past the end of the pickle");
    std::string out(data_ + pos_, static_cast<size_t>(n));
    pos_ += static_cast<size_t>(n);
    return out;
  }
  template <typename T>
  T le() {
    T value{};
    const auto raw = bytes(sizeof(T));
    std::memcpy(&value, raw.data(), sizeof(T));  // little-endian host
    return value;
  }
  std::string line() {
    const void* end = std::memchr(data_ + pos_, '\n', size_ - pos_);
    if (!end) fail("a text argument has no end of line");
    const size_t n = static_cast<const char*>(end) - (data_ + pos_);
    std::string out(data_ + pos_, n);
    pos_ += n + 1;
    return out;
  }
  c10::IValue long_int(uint64_t n) {
    if (n > 8) fail("an integer wider than 64 bits");
    const auto raw = bytes(n);
    int64_t value = 0;
    for (size_t i = 0; i < n; ++i) value |= static_cast<int64_t>(static_cast<uint8_t>(raw[i])) << (8 * i);
    if (n > 0 && n < 8 && (static_cast<uint8_t>(raw[n - 1]) & 0x80)) value -= int64_t{1} << (8 * n);
    return value;
  }
  static c10::IValue text_int(const std::string& text) {
    if (text == "01") return true;
    if (text == "00") return false;
    std::string digits = text;
    if (!digits.empty() && digits.back() == 'L') digits.pop_back();
    return static_cast<int64_t>(std::stoll(digits));
  }
  c10::IValue pop() {
    if (stack_.empty()) fail("the stack is empty");
    auto v = std::move(stack_.back());
    stack_.pop_back();
    return v;
  }
  c10::IValue& top() {
    if (stack_.empty()) fail("the stack is empty");
    return stack_.back();
  }
  size_t pop_mark() {
    if (marks_.empty()) fail("no mark on the stack");
    const size_t m = marks_.back();
    marks_.pop_back();
    if (m > stack_.size()) fail("a mark past the top of the stack");
    return m;
  }
  void tuple(size_t n) {
    if (n > stack_.size()) fail("a tuple longer than the stack");
    std::vector<c10::IValue> items(stack_.end() - static_cast<std::ptrdiff_t>(n), stack_.end());
    stack_.resize(stack_.size() - n);
    stack_.emplace_back(c10::ivalue::Tuple::create(std::move(items)));
  }
  c10::IValue get_memo(uint32_t key) {
    auto it = memo_.find(key);
    if (it == memo_.end()) fail("a memo entry that was never stored");
    return it->second;
  }
  void append(c10::IValue& target, const std::vector<c10::IValue>& items) {
    if (!target.isList()) fail("append onto a " + std::string(target.tagKind()));
    auto list = target.toList();
    for (const auto& item : items) list.push_back(item);
  }
  void set_items(c10::IValue& target, const std::vector<c10::IValue>& items) {
    if (!target.isGenericDict()) fail("setitem onto a " + std::string(target.tagKind()));
    auto dict = target.toGenericDict();
    for (size_t i = 0; i + 1 < items.size(); i += 2) dict.insert_or_assign(items[i], items[i + 1]);
  }
  static std::vector<c10::IValue> elements(const c10::IValue& args) {
    if (args.isTuple()) return args.toTupleRef().elements().vec();
    if (args.isList()) return args.toList().vec();
    return {};
  }
  c10::IValue placeholder(const std::string& cls, const c10::IValue& args) {
    if (notes_) notes_->push_back(cls);
    auto dict = new_dict();
    dict.insert("__python_class__", cls);
    if (!elements(args).empty()) dict.insert("__args__", args);
    return dict;
  }
  c10::IValue call(const c10::IValue& callable, const c10::IValue& args) {
    if (!is_global(callable)) fail("a call of something that is not a class or function");
    const auto name = global_name(callable);
    const auto a = elements(args);
    if (name == "torch._utils._rebuild_tensor_v2" || name == "torch._utils._rebuild_tensor" ||
        name == "torch._utils._rebuild_tensor_v3") {
      if (a.size() < 4 || !a[0].isTensor()) fail("a malformed " + name);
      const auto& storage = a[0].toTensor();
      const auto sizes = elements(a[2]), strides = elements(a[3]);
      if (sizes.size() != strides.size() || !a[1].isInt()) fail("a malformed " + name);
      std::vector<int64_t> size, stride;
      for (const auto& s : sizes) size.push_back(s.isInt() ? s.toInt() : -1);
      for (const auto& s : strides) stride.push_back(s.isInt() ? s.toInt() : -1);
      const int64_t offset = a[1].toInt();
      const auto problem = tensor_extent_problem(offset, size, stride, storage.numel());
      if (!problem.empty()) fail(problem);
      at::Tensor t = at::empty({0}, storage.options());
      t.set_(storage.storage(), offset, size, stride);
      return t;
    }
    if (name == "torch._utils._rebuild_parameter" ||
        name == "torch._utils._rebuild_parameter_with_state") {
      if (a.empty() || !a[0].isTensor()) fail("a malformed " + name);
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
    return placeholder(name, args);
  }
  void build(c10::IValue& target, const c10::IValue& state) {
    // An OrderedDict's attributes (a state dict's _metadata) and tensors'
    // Python attributes are dropped; a placeholder object keeps its state.
    if (target.isGenericDict()) {
      auto dict = target.toGenericDict();
      if (dict.contains("__python_class__")) dict.insert_or_assign("__state__", state);
    }
  }
  c10::IValue persistent_load(const c10::IValue& pid) {
    const auto parts = elements(pid);
    if (parts.size() < 5 || !parts[0].isString() || parts[0].toStringRef() != "storage") {
      fail("an unknown persistent reference (expected ('storage', type, key, location, size))");
    }
    const auto type = is_global(parts[1]) ? global_name(parts[1]) : std::string("UntypedStorage");
    const auto key = parts[2].toStringRef();
    auto cached = storages_.find(key);
    if (cached != storages_.end()) return cached->second;
    const auto dtype = storage_dtype(type);
    const std::string record = "data/" + key;
    if (!reader_.hasRecord(record)) fail("the archive has no storage record " + record);
    const int64_t item = static_cast<int64_t>(c10::elementSize(dtype));
    // The pickle names the storage's size too; a consistent file agrees with its
    // record (checked before anything is read or allocated).
    const size_t record_bytes = reader_.getRecordSize(record);
    int64_t claimed = 0;
    if (!parts[4].isInt() || parts[4].toInt() < 0 ||
        __builtin_mul_overflow(parts[4].toInt(), item, &claimed) ||
        static_cast<size_t>(claimed) != record_bytes) {
      fail("storage " + record + " holds " + std::to_string(record_bytes) +
           " bytes but the pickle says " +
           (parts[4].isInt() ? std::to_string(parts[4].toInt()) + " elements of " + type
                             : std::string("a ") + parts[4].tagKind()));
    }
    at::Tensor t;
    if (file_) t = mapped(record, dtype);
    if (!t.defined()) {
      auto [data, nbytes] = reader_.getRecord(record);
      const int64_t numel = static_cast<int64_t>(nbytes) / item;
      c10::Storage storage(c10::Storage::use_byte_size_t(), nbytes, std::move(data), nullptr, false);
      t = at::empty({0}, at::TensorOptions().dtype(dtype));
      t.set_(storage, 0, {numel}, {1});
    }
    storages_.emplace(key, t);
    return t;
  }

  // A stored (uncompressed), aligned record as a view of the mapped file;
  // undefined when the record is not such (it is then read into memory).
  at::Tensor mapped(const std::string& record, c10::ScalarType dtype) {
    const size_t item = c10::elementSize(dtype);
    const size_t header = reader_.getRecordHeaderOffset(record);
    if (header > file_->size() || file_->size() - header < 30) return {};
    const char* local = file_->data() + header;
    uint16_t method = 0;
    std::memcpy(&method, local + 8, 2);
    if (std::memcmp(local, "PK\x03\x04", 4) != 0 || method != 0) return {};
    const size_t offset = reader_.getRecordOffset(record);
    const size_t nbytes = reader_.getRecordSize(record);
    if (offset > file_->size() || nbytes > file_->size() - offset) {
      fail("storage record " + record + " claims " + std::to_string(nbytes) +
           " bytes but the file holds " + std::to_string(file_->size()));
    }
    if (offset % item != 0) return {};
    return file_->tensor(offset, static_cast<int64_t>(nbytes / item), dtype);
  }

  caffe2::serialize::PyTorchStreamReader& reader_;
  std::string what_;
  std::vector<std::string>* notes_;
  std::shared_ptr<const MappedFile> file_;
  const char* data_ = nullptr;
  size_t size_ = 0, pos_ = 0;
  std::vector<c10::IValue> stack_;
  std::vector<size_t> marks_;
  std::unordered_map<uint32_t, c10::IValue> memo_;
  std::unordered_map<std::string, at::Tensor> storages_;
};

// A bare global left as a value (torch.float16 is pickled as the global
// "torch.float16") becomes its dotted name.
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

}  // namespace

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

c10::IValue read_pickle_archive(caffe2::serialize::PyTorchStreamReader& reader,
                                const std::string& what, std::vector<std::string>* notes,
                                std::shared_ptr<const MappedFile> file) {
  if (!reader.hasRecord("data.pkl")) throw std::runtime_error(what + ": the archive has no data.pkl");
  auto [data, size] = reader.getRecord("data.pkl");
  Machine machine(reader, what, notes, std::move(file));
  auto value = machine.run(static_cast<const char*>(data.get()), size);
  if (is_global(value)) return global_name(value);
  name_globals(value);
  return value;
}

}  // namespace fabric
