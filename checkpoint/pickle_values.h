// What the values of a pickle become in C++, for pickle_reader.cpp's machine
// (internal to checkpoint/): Python globals ("module.name") and the calls of
// them that rebuild tensors, OrderedDicts, torch.Size, torch.device...; the
// safety walks over a finished value (nesting, self-containment, expansion of
// shared containers) and its destruction without recursion, so that neither a
// forged file nor a huge honest one can exhaust the stack.
#pragma once

#include <optional>
#include <stdexcept>
#include <string>
#include <unordered_set>
#include <vector>

#include <ATen/core/ivalue.h>

namespace fabric::pickle_detail {

// A malformed value; the machine adds where in data.pkl it was met.
struct PickleError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

using GenericDict = c10::impl::GenericDict;
using GenericList = c10::impl::GenericList;
GenericDict new_dict();

// A Python global (a class or function) on the stack: a string "<kGlobal>module.name".
extern const char* const kGlobal;
bool is_global(const c10::IValue& v);
std::string global_name(const c10::IValue& v);
c10::IValue make_global(const std::string& module, const std::string& name);

// The element dtype of a typed storage class ("torch.FloatStorage"); throws
// PickleError for one this reader does not know.
c10::ScalarType storage_dtype(const std::string& type);

// The items of a tuple or list argument (empty for anything else).
std::vector<c10::IValue> elements(const c10::IValue& args);

// The value a call of the global `name` with `args` builds, for the globals
// this reader understands (tensor and parameter rebuilds, OrderedDict, dict,
// tuple, set, list, torch.Size, torch.device, getattr, LibTorch's typed
// lists, _codecs.encode); nullopt for any other (a placeholder object then).
// Throws PickleError for a malformed rebuild.
std::optional<c10::IValue> call_global(const std::string& name, const std::vector<c10::IValue>& args);

// A Python object (placeholder) as a dict key: a string (c10 dicts hash no
// tuples) that encodes its class and its __dict__ fields; PickleError when a
// field is not hashable (a list or dict).
c10::IValue object_key(const c10::IValue& placeholder);
// The fields of such a key; nullopt for any other value.
std::optional<std::vector<std::pair<std::string, c10::IValue>>> object_key_fields(const c10::IValue& key);

// Containers nested deeper than this are refused (Python's own pickler stops
// at its recursion limit, 1000, so no file Python writes comes near it): every
// walk over a checkpoint, and the destruction of its values, recurses once per
// level.
constexpr int64_t kMaxNesting = 1000;
// The address that identifies a container value (list, dict, tuple), or null.
const void* container_of(const c10::IValue& v);
// Why `root` cannot be returned (a container that contains itself, nesting
// deeper than kMaxNesting, or shared containers that expand to too many when
// walked as a tree), or "" when it can; `seen` gets every container in it.
std::string nesting_problem(const c10::IValue& root, std::unordered_set<const void*>& seen);
// Empties every container reachable from `roots` except those in `keep`,
// without recursion, so that what is left is destroyed one level at a time.
void dismantle(std::vector<c10::IValue> roots, const std::unordered_set<const void*>& keep);
// Replaces bare globals left as values (torch.float16 is pickled as the global
// "torch.float16") by their dotted names, in dicts and lists.
void name_globals(c10::IValue& value);

}  // namespace fabric::pickle_detail
