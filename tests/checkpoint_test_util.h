// What the checkpoint tests share (checkpoint_test.cpp: our own semantics;
// checkpoint_python_test.cpp: files Python and Lightning write and read;
// checkpoint_damage_test.cpp: damaged, forged and hostile files): a small MLP
// with its Python twin, the optimizers both sides build alike, a scratch
// directory and a way to run a Python script.
#pragma once

#include <torch/torch.h>

#include <ATen/CPUGeneratorImpl.h>

#include <csignal>
#include <cstring>
#include <random>
#include <functional>
#include <tuple>
#include <fstream>
#include <iterator>
#include <thread>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "checkpoint/checkpoint.h"
#include "data/tensor_dataset.h"
#include "fabric/fabric.h"
#include "checkpoint/filesystem.h"
#include "checkpoint/serialization.h"
#include "optim/codec.h"
#include "test_util.h"

namespace checkpoint_test {

struct MlpImpl : torch::nn::Module {
  MlpImpl() : fc1(register_module("fc1", torch::nn::Linear(5, 8))),
              fc2(register_module("fc2", torch::nn::Linear(8, 3))) {}
  torch::Tensor forward(torch::Tensor x) { return fc2->forward(torch::relu(fc1->forward(x))); }
  torch::nn::Linear fc1, fc2;
};

inline std::string dir() {
  static const std::string d = [] {
    const std::string path = ::testing::TempDir() + "/checkpoint_test";
    fabric::fs::remove_all(path);
    fabric::fs::make_directories(path);
    return path;
  }();
  return d;
}

inline std::vector<char> read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

inline void expect_same_params(const torch::nn::Module& a, const torch::nn::Module& b) {
  auto pa = a.named_parameters();
  auto pb = b.named_parameters();
  ASSERT_EQ(pa.size(), pb.size());
  for (size_t i = 0; i < pa.size(); ++i) {
    EXPECT_TRUE(torch::equal(pa[i].value(), pb[i].value())) << pa[i].key();
  }
}

inline void expect_same_adam_state(torch::optim::Adam& a, torch::optim::Adam& b) {
  auto sa = fabric::optimizer_state_dict(a).toGenericDict().at("state").toGenericDict();
  auto sb = fabric::optimizer_state_dict(b).toGenericDict().at("state").toGenericDict();
  ASSERT_EQ(sa.size(), sb.size());
  for (const auto& item : sa) {
    auto x = item.value().toGenericDict();
    auto y = sb.at(item.key()).toGenericDict();
    for (const char* key : {"step", "exp_avg", "exp_avg_sq"}) {
      EXPECT_TRUE(torch::equal(x.at(key).toTensor(), y.at(key).toTensor()))
          << "param " << item.key().toInt() << " " << key;
    }
  }
}

// MlpImpl in Python: same layers, same parameter names.
inline const std::string kPythonMlp =
    "class Mlp(torch.nn.Module):\n"
    "    def __init__(self):\n"
    "        super().__init__()\n"
    "        self.fc1 = torch.nn.Linear(5, 8)\n"
    "        self.fc2 = torch.nn.Linear(8, 3)\n"
    "    def forward(self, x):\n"
    "        return self.fc2(torch.relu(self.fc1(x)))\n";

// The optimizers the Lightning tests continue, the same in C++ and Python.
inline std::shared_ptr<torch::optim::Optimizer> make_optimizer(const std::string& name,
                                                        std::vector<torch::Tensor> p) {
  if (name == "sgd") return std::make_shared<torch::optim::SGD>(p, torch::optim::SGDOptions(0.05).momentum(0.9));
  if (name == "adam") return std::make_shared<torch::optim::Adam>(p, torch::optim::AdamOptions(0.01));
  return std::make_shared<torch::optim::AdamW>(p, torch::optim::AdamWOptions(0.01).weight_decay(0.1));
}
inline const std::string kPythonOptimizers =
    "def make(name, m):\n"
    "    if name == 'sgd': return torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)\n"
    "    if name == 'adam': return torch.optim.Adam(m.parameters(), lr=0.01)\n"
    "    return torch.optim.AdamW(m.parameters(), lr=0.01, weight_decay=0.1)\n";

inline std::string run_python(const std::string& name, const std::string& script) {
  const std::string path = dir() + "/" + name + ".py";
  std::ofstream(path) << script;
  auto result = testutil::run_command(testutil::python() + " " + path);
  EXPECT_EQ(result.status, 0) << result.output;
  return result.output;
}

}  // namespace checkpoint_test
