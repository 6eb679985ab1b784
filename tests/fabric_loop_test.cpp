// The Fabric facade in a real loop: "32-true" on the CPU gives bit-identical
// parameters to the same loop in raw LibTorch; data loaders deliver every example
// once per epoch in PyTorch's DistributedSampler order; and the small utilities
// (seeding, printing, logging, callbacks, device moves) do what they say.
#include <torch/torch.h>

#include <ATen/CPUGeneratorImpl.h>

#include <fstream>
#include <set>
#include <sstream>

#include "data/tensor_dataset.h"
#include "loggers/csv_logger.h"
#include "fabric/fabric.h"
#include "checkpoint/filesystem.h"
#include "test_util.h"

namespace {

struct MlpImpl : torch::nn::Module {
  MlpImpl() : fc1(register_module("fc1", torch::nn::Linear(10, 32))),
              fc2(register_module("fc2", torch::nn::Linear(32, 3))) {}
  torch::Tensor forward(torch::Tensor x) { return fc2->forward(torch::relu(fc1->forward(x))); }
  torch::nn::Linear fc1, fc2;
};

std::shared_ptr<MlpImpl> make_mlp(uint64_t seed) {
  torch::manual_seed(seed);
  return std::make_shared<MlpImpl>();
}

fabric::data::TensorDataset make_data(int64_t n) {
  auto generator = at::make_generator<at::CPUGeneratorImpl>(1234);
  auto x = torch::randn({n, 10}, generator);
  auto y = torch::randint(0, 3, {n}, generator, torch::kLong);
  return {x, y};
}

// PyTorch DistributedSampler order for one replica, computed independently.
std::vector<int64_t> reference_order(int64_t n, uint64_t seed, int64_t epoch) {
  auto generator = at::make_generator<at::CPUGeneratorImpl>(seed + epoch);
  auto perm = torch::randperm(n, generator, torch::kLong);
  return {perm.data_ptr<int64_t>(), perm.data_ptr<int64_t>() + n};
}

}  // namespace

TEST(FabricLoop, Fp32CpuMatchesRawLibTorchBitForBit) {
  const int64_t n = 100, batch = 16, steps = 20;
  const uint64_t seed = 7;
  auto data = make_data(n);

  // Through Fabric: shuffled loader, Adam, 20 steps across epochs.
  fabric::Fabric fabric({.accelerator = "cpu", .precision = "32-true"});
  fabric.launch();
  fabric.seed_everything(seed);
  auto model = make_mlp(seed);
  auto optimizer = std::make_shared<torch::optim::Adam>(model->parameters(), 1e-2);
  auto [net, opt] = fabric.setup(model, optimizer);
  auto loader = fabric.setup_dataloader(data, {.batch_size = batch, .shuffle = true});
  int64_t done = 0;
  while (done < steps) {
    for (auto& b : loader) {
      if (done == steps) break;
      opt.zero_grad();
      auto loss = torch::cross_entropy_loss(net(b.data), b.target);
      fabric.backward(loss);
      opt.step();
      ++done;
    }
  }

  // Raw LibTorch: the same batches, indexed by hand.
  auto ref = make_mlp(seed);
  torch::optim::Adam ref_opt(ref->parameters(), 1e-2);
  done = 0;
  for (int64_t epoch = 0; done < steps; ++epoch) {
    auto order = reference_order(n, seed, epoch);
    for (int64_t start = 0; start < n && done < steps; start += batch, ++done) {
      std::vector<int64_t> rows(order.begin() + start,
                                order.begin() + std::min(n, start + batch));
      auto index = torch::tensor(rows, torch::kLong);
      ref_opt.zero_grad();
      auto loss = torch::cross_entropy_loss(ref->forward(data.data().index_select(0, index)),
                                            data.target().index_select(0, index));
      loss.backward();
      ref_opt.step();
    }
  }
  auto a = model->named_parameters();
  auto b = ref->named_parameters();
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_TRUE(torch::equal(a[i].value(), b[i].value())) << a[i].key();
  }
  // And training moved them.
  EXPECT_FALSE(torch::equal(model->fc1->weight, make_mlp(seed)->fc1->weight));
}

TEST(FabricLoop, LoaderCoversEveryIndexOncePerEpochAndReshuffles) {
  const int64_t n = 50;
  fabric::Fabric fabric({.accelerator = "cpu"});
  fabric.seed_everything(11);
  // Targets carry the example index so batches reveal the order.
  auto dataset = fabric::data::TensorDataset(torch::randn({n, 2}), torch::arange(n));
  auto loader = fabric.setup_dataloader(dataset, {.batch_size = 8, .shuffle = true});
  EXPECT_EQ(loader.size(), 7u);
  std::vector<std::vector<int64_t>> epochs;
  for (int epoch = 0; epoch < 3; ++epoch) {
    std::vector<int64_t> seen;
    size_t batches = 0;
    for (auto& b : loader) {
      EXPECT_EQ(b.data.device(), fabric.device());
      EXPECT_LE(b.data.size(0), 8);
      for (int64_t i = 0; i < b.target.size(0); ++i) seen.push_back(b.target[i].item<int64_t>());
      ++batches;
    }
    EXPECT_EQ(batches, 7u);
    EXPECT_EQ(seen, reference_order(n, 11, epoch)) << "epoch " << epoch;
    EXPECT_EQ(std::set<int64_t>(seen.begin(), seen.end()).size(), static_cast<size_t>(n));
    epochs.push_back(seen);
  }
  EXPECT_NE(epochs[0], epochs[1]);
  EXPECT_NE(epochs[1], epochs[2]);
  // set_epoch replays an epoch's order.
  loader.set_epoch(1);
  std::vector<int64_t> replay;
  for (auto& b : loader) {
    for (int64_t i = 0; i < b.target.size(0); ++i) replay.push_back(b.target[i].item<int64_t>());
  }
  EXPECT_EQ(replay, epochs[1]);
}

TEST(FabricLoop, LoaderWithoutShuffleAndDropLast) {
  fabric::Fabric fabric({.accelerator = "cpu"});
  auto dataset = fabric::data::TensorDataset(torch::randn({10, 2}), torch::arange(10));
  auto loader = fabric.setup_dataloader(dataset, {.batch_size = 4, .drop_last = true});
  EXPECT_EQ(loader.size(), 2u);
  std::vector<int64_t> seen;
  for (auto& b : loader) {
    EXPECT_EQ(b.target.size(0), 4);
    for (int64_t i = 0; i < 4; ++i) seen.push_back(b.target[i].item<int64_t>());
  }
  EXPECT_EQ(seen, (std::vector<int64_t>{0, 1, 2, 3, 4, 5, 6, 7}));
  EXPECT_THROW_WITH(fabric.setup_dataloader(dataset, {.batch_size = 0}), "batch_size");
}

TEST(FabricLoop, LoaderAcceptsPerExampleDatasets) {
  // A plain torch::data::Dataset of single examples is stacked into batches.
  struct Squares : torch::data::datasets::Dataset<Squares> {
    torch::data::Example<> get(size_t i) override {
      return {torch::full({2}, static_cast<float>(i)), torch::tensor(static_cast<int64_t>(i * i))};
    }
    std::optional<size_t> size() const override { return 6; }
  };
  fabric::Fabric fabric({.accelerator = "cpu"});
  auto loader = fabric.setup_dataloader(Squares(), {.batch_size = 4});
  std::vector<int64_t> sizes;
  for (auto& b : loader) {
    sizes.push_back(b.data.size(0));
    EXPECT_EQ(b.data.sizes(), (std::vector<int64_t>{b.data.size(0), 2}));
    EXPECT_TRUE(torch::equal(b.target, b.data.select(1, 0).to(torch::kLong).pow(2)));
  }
  EXPECT_EQ(sizes, (std::vector<int64_t>{4, 2}));
}

TEST(FabricLoop, SamplerMatchesPythonDistributedSampler) {
  // Independent reference: PyTorch's own DistributedSampler, run in Python.
  const std::string script =
      "import torch\n"
      "from torch.utils.data.distributed import DistributedSampler\n"
      "for (n, r, rank, drop) in [(23, 2, 0, False), (23, 2, 1, False), (23, 3, 2, True)]:\n"
      "    s = DistributedSampler(range(n), num_replicas=r, rank=rank, shuffle=True, seed=5, "
      "drop_last=drop)\n"
      "    for e in range(2):\n"
      "        s.set_epoch(e)\n"
      "        print(' '.join(str(i) for i in s))\n";
  const std::string path = ::testing::TempDir() + "/sampler_reference.py";
  std::ofstream(path) << script;
  auto result = testutil::run_command(testutil::python() + " " + path);
  ASSERT_EQ(result.status, 0) << result.output;
  std::istringstream lines(result.output);
  struct Case { int64_t n, r, rank; bool drop; };
  for (const Case& c : {Case{23, 2, 0, false}, Case{23, 2, 1, false}, Case{23, 3, 2, true}}) {
    fabric::DistributedSampler sampler(c.n, {.num_replicas = c.r, .rank = c.rank,
                                             .shuffle = true, .seed = 5, .drop_last = c.drop});
    for (int epoch = 0; epoch < 2; ++epoch) {
      std::string line;
      do {
        ASSERT_TRUE(std::getline(lines, line)) << result.output;
      } while (line.find_first_not_of("0123456789 ") != std::string::npos);  // skip warnings
      std::vector<size_t> expected;
      std::istringstream numbers(line);
      for (size_t i; numbers >> i;) expected.push_back(i);
      sampler.set_epoch(epoch);
      EXPECT_EQ(sampler.indices(), expected) << "n=" << c.n << " replicas=" << c.r
                                             << " rank=" << c.rank << " epoch=" << epoch;
    }
  }
}

TEST(FabricLoop, SetupAcceptsModuleHoldersAndChecksArguments) {
  fabric::Fabric fabric({.accelerator = "cpu", .precision = "64-true"});
  torch::nn::Linear linear(4, 2);
  auto net = fabric.setup(linear);
  EXPECT_EQ(linear->weight.scalar_type(), torch::kDouble);
  EXPECT_EQ(net(torch::ones({1, 4})).scalar_type(), torch::kDouble);
  EXPECT_EQ(net.module().get(), linear.ptr().get());
  EXPECT_THROW_WITH(fabric.setup(std::shared_ptr<MlpImpl>()), "module is a null pointer");
  EXPECT_THROW_WITH(fabric.setup_optimizer(nullptr), "optimizer is a null pointer");
}

TEST(FabricLoop, OptimizerOnAnotherDeviceIsRejected) {
  if (fabric::cuda_device_count() == 0) GTEST_SKIP() << "needs a GPU to put the module elsewhere";
  fabric::Fabric fabric({.accelerator = "cuda", .devices = 1});
  auto model = make_mlp(0);
  auto optimizer = std::make_shared<torch::optim::SGD>(model->parameters(), 0.1);
  EXPECT_THROW_WITH(fabric.setup_optimizer(optimizer), "parameter on cpu", "set up the module");
}

TEST(FabricLoop, SeedEverythingReproducesDraws) {
  fabric::Fabric fabric({.accelerator = "cpu"});
  testutil::EnvGuard env("PL_GLOBAL_SEED", std::nullopt);
  EXPECT_EQ(fabric.seed_everything(123), 123u);
  EXPECT_STREQ(std::getenv("PL_GLOBAL_SEED"), "123");
  auto a = torch::rand({5});
  fabric.seed_everything(123);
  EXPECT_TRUE(torch::equal(a, torch::rand({5})));
  EXPECT_EQ(fabric.seed_everything(), 123u) << "no argument reads PL_GLOBAL_SEED";
}

TEST(FabricLoop, PrintLogAndCallbacks) {
  struct Counter : fabric::Callback {
    void on(const std::string& hook, fabric::Fabric& f) override {
      hooks.push_back(hook + "@" + std::to_string(f.global_rank()));
    }
    std::vector<std::string> hooks;
  };
  const auto dir = ::testing::TempDir() + "/csv_logger_test";
  fabric::fs::remove_all(dir);
  auto counter = std::make_shared<Counter>();
  auto logger = std::make_shared<fabric::CSVLogger>(dir);
  {
    fabric::Fabric fabric({.accelerator = "cpu", .callbacks = {counter}, .loggers = {logger}});
    ::testing::internal::CaptureStdout();
    fabric.print("loss ", 0.5, " step ", 3);
    EXPECT_EQ(::testing::internal::GetCapturedStdout(), "loss 0.5 step 3\n");
    fabric.log("loss", 0.25);
    fabric.log_dict({{"acc", 0.75}, {"loss", 0.125}}, 10);
    fabric.log("loss", 0.0625);
    fabric.call("on_train_epoch_end");
  }
  EXPECT_EQ(counter->hooks, (std::vector<std::string>{"on_train_epoch_end@0"}));
  std::ifstream in(dir + "/lightning_logs/version_0/metrics.csv");
  std::stringstream content;
  content << in.rdbuf();
  // Lightning's CSVLogger layout: sorted names and step as columns, the header
  // widened (and earlier rows rewritten) when "acc" first appears.
  EXPECT_EQ(content.str(), "acc,loss,step\r\n,0.25,0\r\n0.75,0.125,10\r\n,0.0625,11\r\n");
}

TEST(FabricLoop, ToDeviceAndLaunchOnce) {
  fabric::Fabric fabric({.accelerator = "cpu"});
  auto t = fabric.to_device(torch::ones({2}));
  EXPECT_EQ(t.device(), fabric.device());
  auto batch = fabric.to_device(torch::data::Example<>{torch::ones({1}), torch::zeros({1})});
  EXPECT_EQ(batch.target.device(), fabric.device());
  EXPECT_EQ(fabric.launch([](fabric::Fabric& f) { return f.world_size(); }), 1);
  EXPECT_THROW_WITH(fabric.launch(), "already called");
}

TEST(FabricLoop, DistributedSamplerCoversEveryIndexOnceAcrossRanks) {
  for (bool drop_last : {false, true}) {
    SCOPED_TRACE(drop_last ? "drop_last" : "padded");
    const size_t n = 10;  // not a multiple of 3 ranks
    std::vector<std::vector<size_t>> previous;
    for (int epoch = 0; epoch < 3; ++epoch) {
      std::vector<size_t> all;
      std::vector<std::vector<size_t>> per_rank;
      for (int64_t rank = 0; rank < 3; ++rank) {
        fabric::DistributedSampler sampler(
            n, {.num_replicas = 3, .rank = rank, .shuffle = true, .seed = 9, .drop_last = drop_last});
        sampler.set_epoch(epoch);
        auto mine = sampler.indices();
        EXPECT_EQ(mine.size(), drop_last ? 3u : 4u);
        all.insert(all.end(), mine.begin(), mine.end());
        per_rank.push_back(mine);
      }
      std::set<size_t> distinct(all.begin(), all.end());
      if (drop_last) {
        EXPECT_EQ(all.size(), 9u);
        EXPECT_EQ(distinct.size(), 9u) << "no index twice";
      } else {
        EXPECT_EQ(all.size(), 12u);  // padded with the head of the permutation
        EXPECT_EQ(distinct.size(), n) << "every index at least once";
      }
      if (epoch > 0) {
        EXPECT_NE(per_rank, previous) << "epoch " << epoch << " repeats";
      }
      previous = per_rank;
    }
  }
}
