#include "data.h"

#include <dirent.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <vector>

#include <torch/torch.h>

at::Tensor load_fortunes(const std::string& dir) {
  std::vector<std::string> names;
  if (DIR* d = ::opendir(dir.c_str())) {
    while (const dirent* entry = ::readdir(d)) {
      const std::string name = entry->d_name;
      if (!name.empty() && name.find('.') == std::string::npos) names.push_back(name);
    }
    ::closedir(d);
  }
  std::sort(names.begin(), names.end());
  std::string text;
  for (const auto& name : names) {
    std::ifstream in(dir + "/" + name, std::ios::binary);
    text.append(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  if (text.size() < 10000) {
    throw std::runtime_error("gpt: no training text in " + dir +
                             " (install Debian's `fortunes` package: scripts/setup.sh does, or "
                             "`apt-get install fortunes`; or pass --data DIR)");
  }
  auto bytes = torch::empty({static_cast<int64_t>(text.size())}, torch::kUInt8);
  std::memcpy(bytes.data_ptr(), text.data(), text.size());
  return bytes.to(torch::kLong);
}

std::pair<at::Tensor, at::Tensor> get_batch(const at::Tensor& data, int64_t batch, int64_t block,
                                            at::Generator& gen) {
  auto starts = torch::randint(0, data.size(0) - block - 1, {batch}, gen);
  std::vector<at::Tensor> xs, ys;
  for (int64_t i = 0; i < batch; ++i) {
    const int64_t s = starts[i].item<int64_t>();
    xs.push_back(data.slice(0, s, s + block));
    ys.push_back(data.slice(0, s + 1, s + block + 1));
  }
  return {torch::stack(xs), torch::stack(ys)};
}
