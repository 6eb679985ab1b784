// A strategy of the program's own, defined in this file alone and chosen by name
// (strategies/registry.h), or handed in ready-made (FabricOptions::strategy_plugin):
// it trains as the built-in it extends, and the table it joins is where errors and
// help take their names from.
#include <gtest/gtest.h>

#include <torch/torch.h>

#include "fabric/fabric.h"
#include "strategies/registry.h"
#include "strategies/single_device.h"
#include "test_util.h"

namespace {

// single_device's behaviour, counting the backward passes it runs.
class CountingStrategy : public fabric::strategies::SingleDeviceStrategy {
 public:
  using SingleDeviceStrategy::SingleDeviceStrategy;
  std::string name() const override { return "test_counting"; }
  void backward(const at::Tensor& loss) override {
    ++backwards;
    SingleDeviceStrategy::backward(loss);
  }
  int backwards = 0;
};

std::shared_ptr<CountingStrategy> g_last;  // the instance the factory built last

// The one line that adds it.
const bool g_registered = fabric::strategies::register_strategy(
    "test_counting",
    [](const fabric::strategies::StrategyArgs& args) {
      g_last = std::make_shared<CountingStrategy>(args.topology.parallel_devices.at(0));
      return g_last;
    },
    "single_device, counting its backward passes (tests/custom_strategy_test.cpp)");

// Three SGD steps of a small regression; the trained parameters.
std::vector<torch::Tensor> train(fabric::FabricOptions options) {
  options.accelerator = "cpu";
  fabric::Fabric fabric(options);
  fabric.launch();
  torch::manual_seed(0);
  auto model = std::make_shared<torch::nn::LinearImpl>(4, 2);
  auto [net, opt] = fabric.setup(model, std::make_shared<torch::optim::SGD>(model->parameters(), 0.1));
  const auto x = torch::randn({8, 4}), y = torch::randn({8, 2});
  for (int step = 0; step < 3; ++step) {
    opt.zero_grad();
    fabric.backward(torch::mse_loss(net(x), y));
    opt.step();
  }
  std::vector<torch::Tensor> out;
  for (const auto& p : model->parameters()) out.push_back(p.detach().clone());
  return out;
}

}  // namespace

TEST(CustomStrategy, DefinedInATestFileTrainsByNameAsTheBuiltInItExtends) {
  ASSERT_TRUE(g_registered);
  const auto reference = train({.strategy = "single_device"});
  const auto got = train({.strategy = "test_counting"});
  ASSERT_TRUE(g_last);
  EXPECT_EQ(g_last->backwards, 3);
  ASSERT_EQ(got.size(), reference.size());
  for (size_t i = 0; i < got.size(); ++i) EXPECT_TRUE(torch::equal(got[i], reference[i])) << "tensor " << i;
  // It joins the table the errors and every CLI's help read.
  const auto names = fabric::strategies::valid_strategies();
  EXPECT_NE(std::find(names.begin(), names.end(), "test_counting"), names.end());
  EXPECT_NE(fabric::strategies::strategy_choices().find("test_counting"), std::string::npos);
  EXPECT_THROW_WITH(fabric::Fabric({.accelerator = "cpu", .strategy = "no_such"}), "strategy='no_such'",
                    "'single_device'", "'ddp'", "'fsdp'", "'test_counting'");
}

TEST(CustomStrategy, NamesAlreadyTakenOrReservedAreRefused) {
  const auto factory = [](const fabric::strategies::StrategyArgs& args) {
    return std::make_shared<CountingStrategy>(args.topology.parallel_devices.at(0));
  };
  EXPECT_THROW_WITH(fabric::strategies::register_strategy("ddp", factory), "'ddp' is already registered",
                    "another name");
  EXPECT_THROW_WITH(fabric::strategies::register_strategy("test_counting", factory), "already registered",
                    "counting its backward passes");
  EXPECT_THROW_WITH(fabric::strategies::register_strategy("auto", factory), "\"auto\"");
  EXPECT_THROW_WITH(fabric::strategies::register_strategy("empty", nullptr), "factory is empty");
}

TEST(CustomStrategy, AReadyObjectThroughStrategyPlugin) {
  auto mine = std::make_shared<CountingStrategy>(c10::Device(c10::DeviceType::CPU));
  const auto got = train({.strategy_plugin = mine});
  EXPECT_EQ(mine->backwards, 3);
  const auto reference = train({.strategy = "single_device"});
  for (size_t i = 0; i < got.size(); ++i) EXPECT_TRUE(torch::equal(got[i], reference[i])) << "tensor " << i;
  // Its name or "auto" only; and it must fit the job's world.
  EXPECT_THROW_WITH(fabric::Fabric({.accelerator = "cpu", .strategy = "ddp", .strategy_plugin = mine}),
                    "strategy='ddp'", "strategy_plugin named 'test_counting'", "leave strategy at 'auto'");
  EXPECT_NO_THROW(fabric::Fabric({.accelerator = "cpu", .strategy = "test_counting", .strategy_plugin = mine}));
  EXPECT_THROW_WITH(fabric::Fabric({.accelerator = "cpu", .strategy_plugin = mine, .devices = 2}),
                    "built for a world of 1", "give 2");
}
