// Every precision mode: the dtype parameters are stored in, the dtype activations
// are computed in inside forward, the dtype outputs come back in, and the scoped
// state (autocast, default dtype) being restored afterwards.
#include <torch/torch.h>

#include <ATen/autocast_mode.h>

#include "accelerators/accelerator.h"
#include "fabric/fabric.h"
#include "precision/mixed_precision.h"
#include "precision/registry.h"
#include "precision/scopes.h"
#include "strategies/fsdp/fsdp.h"
#include "test_util.h"

namespace {

// Records what it sees inside forward.
struct ProbeImpl : torch::nn::Module {
  ProbeImpl() : fc1(register_module("fc1", torch::nn::Linear(8, 16))),
                fc2(register_module("fc2", torch::nn::Linear(16, 4))),
                norm(register_module("norm", torch::nn::BatchNorm1d(16))) {}
  torch::Tensor forward(torch::Tensor x) {
    input_dtype = x.scalar_type();
    auto hidden = fc1->forward(x);
    hidden_dtype = hidden.scalar_type();
    default_dtype = c10::get_default_dtype_as_scalartype();
    created_dtype = torch::zeros({1}).scalar_type();
    return fc2->forward(torch::relu(hidden));
  }
  torch::nn::Linear fc1, fc2;
  torch::nn::BatchNorm1d norm;
  c10::ScalarType input_dtype{}, hidden_dtype{}, default_dtype{}, created_dtype{};
};

struct Expected {
  const char* precision;
  c10::ScalarType param, hidden, output, default_in_forward;
};

void check_mode(const Expected& e, const std::string& accelerator) {
  SCOPED_TRACE(std::string(e.precision) + " on " + accelerator);
  // One device: on a machine with several GPUs, "auto" would mean DDP over all.
  fabric::Fabric fabric({.accelerator = accelerator, .devices = 1, .precision = e.precision});
  auto probe = std::make_shared<ProbeImpl>();
  auto net = fabric.setup(probe);
  for (const auto& p : probe->parameters()) EXPECT_EQ(p.scalar_type(), e.param);
  EXPECT_EQ(probe->norm->running_mean.scalar_type(), e.param);
  // Integer buffers keep their type whatever the precision.
  EXPECT_EQ(probe->norm->num_batches_tracked.scalar_type(), torch::kLong);
  // A float32 input on the device, as a data loader gives.
  auto out = net(fabric.to_device(torch::randn({5, 8})));
  EXPECT_EQ(probe->hidden_dtype, e.hidden);
  EXPECT_EQ(probe->default_dtype, e.default_in_forward);
  EXPECT_EQ(probe->created_dtype, e.default_in_forward);
  EXPECT_EQ(out.scalar_type(), e.output);
  EXPECT_EQ(out.device().type(), fabric.device().type());
  // Scoped state is gone after forward.
  EXPECT_FALSE(at::autocast::is_autocast_enabled(fabric.device().type()));
  EXPECT_EQ(c10::get_default_dtype_as_scalartype(), torch::kFloat);
  // And the graph is differentiable back to float32-or-param-dtype parameters.
  fabric.backward(out.sum());
  for (const auto& p : {probe->fc1->weight, probe->fc1->bias, probe->fc2->weight}) {
    ASSERT_TRUE(p.grad().defined());
    EXPECT_EQ(p.grad().scalar_type(), e.param);
  }
}

const Expected kCpuModes[] = {
    {"32-true", torch::kFloat, torch::kFloat, torch::kFloat, torch::kFloat},
    {"64-true", torch::kDouble, torch::kDouble, torch::kDouble, torch::kDouble},
    {"bf16-true", torch::kBFloat16, torch::kBFloat16, torch::kFloat, torch::kBFloat16},
    {"16-true", torch::kHalf, torch::kHalf, torch::kFloat, torch::kHalf},
    {"bf16-mixed", torch::kFloat, torch::kBFloat16, torch::kFloat, torch::kFloat},
};

}  // namespace

TEST(Precision, EveryModeOnCpu) {
  for (const auto& mode : kCpuModes) check_mode(mode, "cpu");
}

TEST(Precision, EveryModeOnCuda) {
  if (fabric::cuda_device_count() == 0) GTEST_SKIP() << "no GPU visible";
  for (const auto& mode : kCpuModes) check_mode(mode, "cuda");
  check_mode({"16-mixed", torch::kFloat, torch::kHalf, torch::kFloat, torch::kFloat}, "cuda");
  fabric::Fabric fabric({.accelerator = "cuda", .devices = 1, .precision = "16-mixed"});
  ASSERT_NE(fabric.precision().scaler(), nullptr);
  EXPECT_EQ(fabric.precision().scaler()->get_scale(), 65536.0);
}

TEST(Precision, InitModuleCreatesParametersInPrecisionDtype) {
  fabric::Fabric fabric({.accelerator = "cpu", .precision = "bf16-true"});
  auto probe = fabric.init_module<ProbeImpl>();
  for (const auto& p : probe->parameters()) EXPECT_EQ(p.scalar_type(), torch::kBFloat16);
  EXPECT_EQ(c10::get_default_dtype_as_scalartype(), torch::kFloat);

  fabric::Fabric fp64({.accelerator = "cpu", .precision = "64-true"});
  auto probe64 = fp64.init_module<ProbeImpl>();
  for (const auto& p : probe64->parameters()) EXPECT_EQ(p.scalar_type(), torch::kDouble);
  // Mixed precision keeps float32 parameters.
  fabric::Fabric mixed({.accelerator = "cpu", .precision = "bf16-mixed"});
  for (const auto& p : mixed.init_module<ProbeImpl>()->parameters()) {
    EXPECT_EQ(p.scalar_type(), torch::kFloat);
  }
}

TEST(Precision, AutocastGuardEnablesAndRestores) {
  fabric::Fabric fabric({.accelerator = "cpu", .precision = "bf16-mixed"});
  auto a = torch::randn({4, 4});
  EXPECT_FALSE(at::autocast::is_autocast_enabled(c10::kCPU));
  {
    auto guard = fabric.autocast();
    EXPECT_TRUE(at::autocast::is_autocast_enabled(c10::kCPU));
    EXPECT_EQ(torch::mm(a, a).scalar_type(), torch::kBFloat16);
    {
      auto nested = fabric.autocast();
      EXPECT_TRUE(at::autocast::is_autocast_enabled(c10::kCPU));
    }
    EXPECT_TRUE(at::autocast::is_autocast_enabled(c10::kCPU));
  }
  EXPECT_FALSE(at::autocast::is_autocast_enabled(c10::kCPU));
  EXPECT_EQ(torch::mm(a, a).scalar_type(), torch::kFloat);
  // 32-true has no forward context at all.
  fabric::Fabric fp32({.accelerator = "cpu"});
  EXPECT_EQ(fp32.autocast(), nullptr);
}

TEST(Precision, MixedMatchesPlainAutocastComputation) {
  // The wrapper's forward equals LibTorch's own autocast run by hand.
  fabric::Fabric fabric({.accelerator = "cpu", .precision = "bf16-mixed"});
  torch::manual_seed(3);
  auto probe = std::make_shared<ProbeImpl>();
  auto net = fabric.setup(probe);
  auto x = torch::randn({6, 8});
  auto out = net(x);
  torch::Tensor reference;
  {
    fabric::precision::AutocastScope scope(c10::kCPU, torch::kBFloat16);
    reference = probe->forward(x.to(torch::kBFloat16)).to(torch::kFloat);
  }
  EXPECT_TRUE(torch::equal(out, reference));
}

TEST(Precision, TupleAndVectorOutputsAreConverted) {
  struct TwoHeadsImpl : torch::nn::Module {
    TwoHeadsImpl() : fc(register_module("fc", torch::nn::Linear(3, 3))) {}
    std::tuple<torch::Tensor, torch::Tensor, int> forward(torch::Tensor x) {
      auto y = fc->forward(x);
      return {y, y.argmax(1), 7};
    }
    torch::nn::Linear fc;
  };
  fabric::Fabric fabric({.accelerator = "cpu", .precision = "bf16-true"});
  auto net = fabric.setup(std::make_shared<TwoHeadsImpl>());
  auto [y, index, seven] = net(torch::randn({2, 3}));
  EXPECT_EQ(y.scalar_type(), torch::kFloat);
  EXPECT_EQ(index.scalar_type(), torch::kLong);
  EXPECT_EQ(seven, 7);
}

// The strategy owns the precision plugin: Fabric hands it its own (or the user's
// precision_plugin), and FSDP derives what the plugin implies from the object,
// not from a name.
TEST(Precision, TheStrategyOwnsThePluginAndFsdpDerivesItsReduceDtypeFromIt) {
  using fabric::precision::MixedPrecision;
  using fabric::strategies::FSDPStrategy;
  auto bf16 = std::make_shared<MixedPrecision>(torch::kBFloat16, c10::kCPU);
  fabric::Fabric fabric({.accelerator = "cpu", .strategy = "fsdp", .precision_plugin = bf16});
  EXPECT_EQ(&fabric.precision(), bf16.get());
  EXPECT_EQ(fabric.strategy().precision_plugin(), bf16);
  auto& fsdp = dynamic_cast<FSDPStrategy&>(fabric.strategy());
  EXPECT_EQ(fsdp.reduce_dtype(), torch::kBFloat16);  // a plugin's compute dtype, not its name
  for (const auto& [precision, expected] :
       std::vector<std::pair<std::string, std::optional<c10::ScalarType>>>{
           {"32-true", std::nullopt}, {"64-true", std::nullopt}, {"bf16-mixed", torch::kBFloat16},
           {"bf16-true", torch::kBFloat16}, {"16-true", torch::kHalf}}) {
    fabric::Fabric f({.accelerator = "cpu", .strategy = "fsdp", .precision = precision});
    EXPECT_EQ(dynamic_cast<FSDPStrategy&>(f.strategy()).reduce_dtype(), expected) << precision;
  }
  // An explicit reduce_dtype wins over the plugin's.
  fabric::Fabric fp32({.accelerator = "cpu", .strategy = "fsdp", .precision = "bf16-mixed",
                       .fsdp = {.reduce_dtype = "fp32"}});
  EXPECT_EQ(dynamic_cast<FSDPStrategy&>(fp32.strategy()).reduce_dtype(), torch::kFloat);
  EXPECT_THROW_WITH(fabric.strategy().set_precision(nullptr), "null precision plugin");
}

TEST(Precision, ShardedFsdpGivesTheScalerItsFoundInfReducerAndTakesItBack) {
  using fabric::precision::MixedPrecision;
  using fabric::strategies::FSDPStrategy;
  auto plugin = std::make_shared<MixedPrecision>(torch::kHalf, c10::kCPU,
                                                 std::make_unique<fabric::precision::GradScaler>());
  auto* scaler = plugin->scaler();
  fabric::strategies::Topology one;
  one.parallel_devices = {c10::Device(c10::kCPU)};
  {
    FSDPStrategy sharded(one, {});
    sharded.set_precision(plugin);
    EXPECT_TRUE(scaler->has_found_inf_reducer());
    EXPECT_EQ(sharded.reduce_dtype(), torch::kHalf);
    // Handing it another plugin takes the reducer off the first one.
    sharded.set_precision(std::make_shared<MixedPrecision>(torch::kBFloat16, c10::kCPU));
    EXPECT_FALSE(scaler->has_found_inf_reducer());
    sharded.set_precision(plugin);
  }
  EXPECT_FALSE(scaler->has_found_inf_reducer());  // the strategy is gone
  // NO_SHARD all-reduces whole gradients: every rank's flags agree already.
  FSDPStrategy replicated(one, {}, {.sharding_strategy = "NO_SHARD"});
  replicated.set_precision(plugin);
  EXPECT_FALSE(scaler->has_found_inf_reducer());
}
