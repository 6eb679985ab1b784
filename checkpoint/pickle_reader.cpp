#include "checkpoint/pickle_reader.h"

#include "checkpoint/mapped_file.h"
#include "checkpoint/pickle_values.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <map>
#include <stdexcept>
#include <unordered_map>
#include <unordered_set>

#include <ATen/ops/empty.h>
#include <c10/core/Storage.h>
#include <caffe2/serialize/inline_container.h>

namespace fabric {
namespace {

using namespace pickle_detail;

class Machine {
 public:
  Machine(caffe2::serialize::PyTorchStreamReader* reader, std::string what,
          std::vector<std::string>* notes, std::shared_ptr<const MappedFile> file)
      : reader_(reader), what_(std::move(what)), notes_(notes), file_(std::move(file)) {}
  // Nothing the machine built is destroyed recursively: what the result does
  // not hold is taken apart level by level (everything, after a failure).
  ~Machine() {
    std::vector<c10::IValue> all = std::move(graveyard_);
    for (auto& v : stack_) all.push_back(std::move(v));
    for (auto& item : memo_) all.push_back(std::move(item.second));
    stack_.clear();
    memo_.clear();
    try {
      dismantle(std::move(all), kept_);
    } catch (...) {
    }
  }

  // Unpickles, then checks the result's nesting (see kMaxNesting).
  c10::IValue read(const char* data, size_t size) {
    c10::IValue result = run(data, size);
    graveyard_.push_back(result);  // taken apart with the rest if refused
    const auto why = nesting_problem(result, kept_);
    if (!why.empty()) {
      kept_.clear();
      fail(why);
    }
    return result;
  }

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
          std::vector<c10::IValue> items(stack_.begin() + static_cast<std::ptrdiff_t>(start), stack_.end());
          drop_to(start);
          c10::IValue list{GenericList(c10::AnyType::get())};
          append(list, items);
          stack_.push_back(std::move(list));
          break;
        }
        case 'd': {                                                         // DICT
          const size_t start = pop_mark();
          std::vector<c10::IValue> items(stack_.begin() + static_cast<std::ptrdiff_t>(start), stack_.end());
          drop_to(start);
          c10::IValue dict{new_dict()};
          set_items(dict, items);
          stack_.push_back(std::move(dict));
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
          drop_to(start);
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
          drop_to(start);
          set_items(top(), items);
          break;
        }
        case '0': pop(); break;                                             // POP
        case '1': drop_to(pop_mark()); break;                               // POP_MARK
        case '2': stack_.push_back(top()); break;                           // DUP
        case 'q': remember(le<uint8_t>()); break;                           // BINPUT
        case 'r': remember(le<uint32_t>()); break;                          // LONG_BINPUT
        case 0x94: remember(static_cast<uint32_t>(memo_.size())); break;    // MEMOIZE
        case 'p': remember(static_cast<uint32_t>(std::stoul(line()))); break;  // PUT
        case 'h': stack_.push_back(get_memo(le<uint8_t>())); break;         // BINGET
        case 'j': stack_.push_back(get_memo(le<uint32_t>())); break;        // LONG_BINGET
        case 'g': stack_.push_back(get_memo(static_cast<uint32_t>(std::stoul(line())))); break;  // GET
        case 'c': {                                                         // GLOBAL
          const auto module = line();
          const auto name = line();
          stack_.emplace_back(make_global(module, name));
          break;
        }
        case 0x93: {                                                        // STACK_GLOBAL
          const auto name = pop().toStringRef();
          const auto module = pop().toStringRef();
          stack_.emplace_back(make_global(module, name));
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
    throw std::runtime_error(what_ + ": " + why + " at byte " + std::to_string(pos_) +
                             (reader_ ? " of data.pkl" : ""));
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
  // Values leave the stack and memo only into the graveyard: none is destroyed
  // while the pickle runs (see ~Machine).
  c10::IValue pop() {
    if (stack_.empty()) fail("the stack is empty");
    auto v = std::move(stack_.back());
    stack_.pop_back();
    graveyard_.push_back(v);
    return v;
  }
  void drop_to(size_t size) {
    while (stack_.size() > size) {
      graveyard_.push_back(std::move(stack_.back()));
      stack_.pop_back();
    }
  }
  void remember(uint32_t key) {
    auto& slot = memo_[key];
    if (!slot.isNone()) graveyard_.push_back(std::move(slot));
    slot = top();
  }
  // Containers get their nesting as they are built (a list or dict may still
  // grow deeper afterwards: read() checks the result exactly).
  void check_depth(const c10::IValue& container, const std::vector<c10::IValue>& items) {
    int64_t depth = 1;
    for (const auto& item : items) {
      if (const void* id = container_of(item)) {
        auto it = depth_.find(id);
        depth = std::max(depth, (it == depth_.end() ? 1 : it->second) + 1);
      }
    }
    auto& known = depth_[container.internalToPointer()];
    known = std::max(known, depth);
    if (known > kMaxNesting) {
      fail("containers nested more than " + std::to_string(kMaxNesting) + " deep");
    }
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
    drop_to(stack_.size() - n);
    c10::IValue t(c10::ivalue::Tuple::create(items));
    check_depth(t, items);
    stack_.push_back(std::move(t));
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
    check_depth(target, items);
  }
  void set_items(c10::IValue& target, const std::vector<c10::IValue>& items) {
    if (!target.isGenericDict()) fail("setitem onto a " + std::string(target.tagKind()));
    auto dict = target.toGenericDict();
    check_depth(target, items);  // before hashing keys (a deep tuple key hashes recursively)
    for (size_t i = 0; i + 1 < items.size(); i += 2) {
      c10::IValue key = items[i];
      if (key.isGenericDict() || key.isList()) {  // a Python object (placeholder) as the key
        try {
          key = object_key(key);
        } catch (const PickleError& e) {
          fail(e.what());
        }
      }
      auto old = dict.find(key);
      if (old != dict.end()) graveyard_.push_back(old->value());
      dict.insert_or_assign(key, items[i + 1]);
    }
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
    try {
      if (auto value = call_global(name, elements(args))) return *value;
    } catch (const PickleError& e) {
      fail(e.what());
    }
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
    if (!reader_) fail("a tensor (persistent reference) in a plain pickle, which holds no storages");
    const auto key = parts[2].toStringRef();
    auto cached = storages_.find(key);
    if (cached != storages_.end()) return cached->second;
    const auto dtype = storage_dtype(type);
    const std::string record = "data/" + key;
    if (!reader_->hasRecord(record)) fail("the archive has no storage record " + record);
    const int64_t item = static_cast<int64_t>(c10::elementSize(dtype));
    // The pickle names the storage's size too; a consistent file agrees with its
    // record (checked before anything is read or allocated).
    const size_t record_bytes = reader_->getRecordSize(record);
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
      auto [data, nbytes] = reader_->getRecord(record);
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
    const size_t header = reader_->getRecordHeaderOffset(record);
    if (header > file_->size() || file_->size() - header < 30) return {};
    const char* local = file_->data() + header;
    uint16_t method = 0;
    std::memcpy(&method, local + 8, 2);
    if (std::memcmp(local, "PK\x03\x04", 4) != 0 || method != 0) return {};
    const size_t offset = reader_->getRecordOffset(record);
    const size_t nbytes = reader_->getRecordSize(record);
    if (offset > file_->size() || nbytes > file_->size() - offset) {
      fail("storage record " + record + " claims " + std::to_string(nbytes) +
           " bytes but the file holds " + std::to_string(file_->size()));
    }
    if (reinterpret_cast<uintptr_t>(file_->data() + offset) % item != 0) return {};
    return file_->tensor(offset, static_cast<int64_t>(nbytes / item), dtype);
  }

  caffe2::serialize::PyTorchStreamReader* reader_;
  std::string what_;
  std::vector<std::string>* notes_;
  std::shared_ptr<const MappedFile> file_;
  const char* data_ = nullptr;
  size_t size_ = 0, pos_ = 0;
  std::vector<c10::IValue> stack_;
  std::vector<size_t> marks_;
  std::unordered_map<uint32_t, c10::IValue> memo_;
  std::vector<c10::IValue> graveyard_;
  std::unordered_map<const void*, int64_t> depth_;
  std::unordered_set<const void*> kept_;  // containers of the returned value
  std::unordered_map<std::string, at::Tensor> storages_;
};

}  // namespace

c10::IValue read_pickle_archive(caffe2::serialize::PyTorchStreamReader& reader,
                                const std::string& what, std::vector<std::string>* notes,
                                std::shared_ptr<const MappedFile> file) {
  if (!reader.hasRecord("data.pkl")) throw std::runtime_error(what + ": the archive has no data.pkl");
  auto [data, size] = reader.getRecord("data.pkl");
  Machine machine(&reader, what, notes, std::move(file));
  auto value = machine.read(static_cast<const char*>(data.get()), size);
  if (is_global(value)) return global_name(value);
  name_globals(value);
  return value;
}

c10::IValue read_pickle(const char* data, size_t size, const std::string& what) {
  Machine machine(nullptr, what, nullptr, nullptr);
  auto value = machine.read(data, size);
  if (is_global(value)) return global_name(value);
  name_globals(value);
  return value;
}

}  // namespace fabric
