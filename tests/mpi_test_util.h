// Helpers shared by the distributed test files (ddp_test.cpp, fsdp_test.cpp),
// which run their worker programs under mpirun and read back what they wrote.
#pragma once

#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <unistd.h>
#include <vector>

#include <torch/torch.h>

namespace testutil {

// The mpirun command line for `ranks` CPU ranks on this machine.
inline std::string mpirun(int ranks = 2) {
  return "mpirun -np " + std::to_string(ranks) + " --bind-to none --oversubscribe" +
         (::geteuid() == 0 ? " --allow-run-as-root" : "");
}

// A list of tensors a worker wrote with torch::pickle_save (empty if the file is
// missing or empty).
inline std::vector<torch::Tensor> read_tensor_list(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<torch::Tensor> out;
  if (bytes.empty()) return out;
  for (const auto& t : torch::pickle_load(bytes).toTensorList()) out.push_back(t);
  return out;
}

// Every tensor of a (nested) checkpoint dict or list, by "/"-joined key path.
inline void flatten_tensors(const c10::IValue& v, const std::string& path,
                            std::map<std::string, torch::Tensor>& out) {
  if (v.isTensor()) {
    out[path] = v.toTensor();
  } else if (v.isGenericDict()) {
    for (const auto& item : v.toGenericDict()) {
      const auto& k = item.key();
      flatten_tensors(item.value(), path + "/" + (k.isString() ? k.toStringRef() : std::to_string(k.toInt())),
                      out);
    }
  } else if (v.isList()) {
    auto list = v.toList();
    for (size_t i = 0; i < list.size(); ++i) flatten_tensors(list.get(i), path + "/" + std::to_string(i), out);
  }
}

}  // namespace testutil
