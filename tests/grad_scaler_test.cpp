// "16-mixed" loss scaling: an injected inf skips the step, halves the scale and
// leaves the parameters alone; growth_interval clean steps double the scale; clean
// steps and clipping see exactly the gradients an unscaled computation gives.
// Runs on the CPU through a precision plugin (LibTorch's AMP kernels have CPU
// implementations); the CUDA variant runs where a GPU is visible.
#include <torch/torch.h>

#include <limits>

#include "accelerators/accelerator.h"
#include "fabric/fabric.h"
#include "precision/mixed_precision.h"
#include "precision/scopes.h"
#include "test_util.h"

using fabric::precision::GradScaler;
using fabric::precision::GradScalerOptions;
using fabric::precision::MixedPrecision;

namespace {

struct NetImpl : torch::nn::Module {
  NetImpl() : fc1(register_module("fc1", torch::nn::Linear(6, 12))),
              fc2(register_module("fc2", torch::nn::Linear(12, 1))) {}
  torch::Tensor forward(torch::Tensor x) { return fc2->forward(torch::tanh(fc1->forward(x))); }
  torch::nn::Linear fc1, fc2;
};

std::shared_ptr<NetImpl> make_net(uint64_t seed) {
  torch::manual_seed(seed);
  return std::make_shared<NetImpl>();
}

std::shared_ptr<fabric::precision::Precision> fp16_plugin(c10::DeviceType device,
                                                         int64_t growth_interval) {
  GradScalerOptions options;
  options.growth_interval = growth_interval;
  return std::make_shared<MixedPrecision>(torch::kHalf, device,
                                          std::make_unique<GradScaler>(options));
}

std::vector<torch::Tensor> snapshot(const torch::nn::Module& m) {
  std::vector<torch::Tensor> out;
  for (const auto& p : m.parameters()) out.push_back(p.detach().clone());
  return out;
}

void run_skip_and_growth(const std::string& accelerator, c10::DeviceType device_type) {
  const int64_t interval = 5;
  fabric::Fabric fabric({.accelerator = accelerator,
                         .devices = 1,
                         .precision_plugin = fp16_plugin(device_type, interval)});
  auto model = make_net(0);
  auto optimizer = std::make_shared<torch::optim::Adam>(model->parameters(), 1e-2);
  auto [net, opt] = fabric.setup(model, optimizer);
  auto* scaler = fabric.precision().scaler();
  ASSERT_NE(scaler, nullptr);
  EXPECT_EQ(scaler->get_scale(), 65536.0);
  auto x = fabric.to_device(torch::randn({16, 6}));
  auto y = fabric.to_device(torch::randn({16, 1}));

  // An inf in one gradient: the step is skipped and the scale halves.
  auto before = snapshot(*model);
  opt.zero_grad();
  fabric.backward(torch::mse_loss(net(x), y));
  model->fc1->weight.mutable_grad()[0][0] = std::numeric_limits<float>::infinity();
  opt.step();
  EXPECT_TRUE(scaler->last_step_skipped());
  EXPECT_EQ(scaler->get_scale(), 32768.0);
  auto after = snapshot(*model);
  for (size_t i = 0; i < before.size(); ++i) EXPECT_TRUE(torch::equal(before[i], after[i]));
  EXPECT_TRUE(optimizer->state().empty()) << "Adam state was created by a skipped step";

  // A nan does the same.
  opt.zero_grad();
  fabric.backward(torch::mse_loss(net(x), y));
  model->fc2->bias.mutable_grad()[0] = std::numeric_limits<float>::quiet_NaN();
  opt.step();
  EXPECT_TRUE(scaler->last_step_skipped());
  EXPECT_EQ(scaler->get_scale(), 16384.0);

  // growth_interval clean steps double the scale, not one step earlier.
  for (int64_t i = 1; i <= interval; ++i) {
    opt.zero_grad();
    fabric.backward(torch::mse_loss(net(x), y));
    opt.step();
    EXPECT_FALSE(scaler->last_step_skipped());
    EXPECT_EQ(scaler->get_scale(), i < interval ? 16384.0 : 32768.0) << "after clean step " << i;
  }
  EXPECT_EQ(scaler->growth_tracker(), 0);
  EXPECT_FALSE(torch::equal(before[0], model->fc1->weight.detach()));
}

}  // namespace

TEST(GradScaler, InfSkipsStepHalvesScaleAndCleanStepsGrowItCpu) {
  run_skip_and_growth("cpu", c10::kCPU);
}

TEST(GradScaler, InfSkipsStepHalvesScaleAndCleanStepsGrowItCuda) {
  if (fabric::cuda_device_count() == 0) GTEST_SKIP() << "no GPU visible";
  run_skip_and_growth("cuda", c10::kCUDA);
}

TEST(GradScaler, DefaultGrowthIntervalIs2000) {
  GradScaler scaler;
  EXPECT_EQ(scaler.options().growth_interval, 2000);
  EXPECT_EQ(scaler.options().growth_factor, 2.0);
  EXPECT_EQ(scaler.options().backoff_factor, 0.5);
  EXPECT_EQ(scaler.get_scale(), 65536.0);
}

TEST(GradScaler, CleanStepEqualsUnscaledReference) {
  // Fabric path: scaled backward, unscale, Adam step.
  fabric::Fabric fabric({.accelerator = "cpu", .precision_plugin = fp16_plugin(c10::kCPU, 2000)});
  auto model = make_net(1);
  auto optimizer = std::make_shared<torch::optim::Adam>(model->parameters(), 1e-2);
  auto [net, opt] = fabric.setup(model, optimizer);
  // Reference: the same computation under plain autocast, no scaling.
  auto ref = make_net(1);
  torch::optim::Adam ref_opt(ref->parameters(), 1e-2);

  auto x = torch::randn({16, 6});
  auto y = torch::randn({16, 1});
  for (int step = 0; step < 3; ++step) {
    opt.zero_grad();
    fabric.backward(torch::mse_loss(net(x), y));
    opt.step();
    ref_opt.zero_grad();
    torch::Tensor out;
    {
      fabric::precision::AutocastScope scope(c10::kCPU, torch::kHalf);
      out = ref->forward(x.to(torch::kHalf)).to(torch::kFloat);
    }
    torch::mse_loss(out, y).backward();
    ref_opt.step();
  }
  auto a = model->parameters();
  auto b = ref->parameters();
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_TRUE(torch::allclose(a[i], b[i], /*rtol=*/1e-6, /*atol=*/1e-7)) << "parameter " << i;
  }
}

TEST(GradScaler, ClipGradientsMatchesClipGradNormOnUnscaledGradients) {
  for (bool by_value : {false, true}) {
    SCOPED_TRACE(by_value ? "clip_val" : "max_norm");
    fabric::Fabric fabric({.accelerator = "cpu",
                           .precision_plugin = fp16_plugin(c10::kCPU, 2000)});
    auto model = make_net(2);
    auto optimizer = std::make_shared<torch::optim::SGD>(model->parameters(), 0.1);
    auto [net, opt] = fabric.setup(model, optimizer);
    auto ref = make_net(2);
    torch::optim::SGD ref_opt(ref->parameters(), 0.1);

    auto x = torch::randn({32, 6}) * 5;
    auto y = torch::randn({32, 1});
    opt.zero_grad();
    fabric.backward(torch::mse_loss(net(x), y));
    fabric::ClipGradientsOptions clip;
    if (by_value) {
      clip.clip_val = 0.01;
    } else {
      clip.max_norm = 0.05;
    }
    auto norm = fabric.clip_gradients(net, opt, clip);

    torch::Tensor out;
    {
      fabric::precision::AutocastScope scope(c10::kCPU, torch::kHalf);
      out = ref->forward(x.to(torch::kHalf)).to(torch::kFloat);
    }
    // Unscaled gradients computed by hand: backward of loss * 2^16 (as the scaler
    // does, so fp16 intermediates do not underflow), then divided by 2^16.
    torch::mse_loss(out, y).mul(65536.0).backward();
    for (auto& p : ref->parameters()) p.mutable_grad().div_(65536.0);
    if (by_value) {
      EXPECT_FALSE(norm.has_value());
      torch::nn::utils::clip_grad_value_(ref->parameters(), 0.01);
    } else {
      const double ref_norm = torch::nn::utils::clip_grad_norm_(ref->parameters(), 0.05);
      ASSERT_TRUE(norm.has_value());
      EXPECT_NEAR(*norm, ref_norm, 1e-6 * ref_norm);
      EXPECT_GT(ref_norm, 0.05) << "the test should actually clip";
    }
    auto a = model->parameters();
    auto b = ref->parameters();
    for (size_t i = 0; i < a.size(); ++i) {
      EXPECT_TRUE(torch::allclose(a[i].grad(), b[i].grad(), 1e-6, 1e-9)) << "grad " << i;
    }
    // The step must not unscale a second time.
    opt.step();
    ref_opt.step();
    for (size_t i = 0; i < a.size(); ++i) {
      EXPECT_TRUE(torch::allclose(a[i], b[i], 1e-6, 1e-9)) << "parameter " << i;
    }
  }
}

TEST(GradScaler, ClipGradientsNeedsExactlyOneLimit) {
  fabric::Fabric fabric({.accelerator = "cpu"});
  auto model = make_net(0);
  auto [net, opt] = fabric.setup(model, std::make_shared<torch::optim::SGD>(model->parameters(), 0.1));
  EXPECT_THROW_WITH(fabric.clip_gradients(net, opt, {}), "exactly one of max_norm and clip_val",
                    "neither");
  EXPECT_THROW_WITH(fabric.clip_gradients(net, opt, {.max_norm = 1.0, .clip_val = 1.0}),
                    "both");
}

TEST(GradScaler, MisuseIsReported) {
  auto model = make_net(0);
  torch::optim::SGD optimizer(model->parameters(), 0.1);
  GradScaler scaler;
  EXPECT_THROW_WITH(scaler.unscale_(optimizer), "before any loss was scaled");
  auto loss = model->forward(torch::randn({2, 6})).sum();
  scaler.scale(loss).backward();
  scaler.unscale_(optimizer);
  EXPECT_THROW_WITH(scaler.unscale_(optimizer), "already called");
  EXPECT_TRUE(scaler.step(optimizer));
  EXPECT_THROW_WITH(scaler.step(optimizer), "already called");
  scaler.update();
  EXPECT_THROW_WITH(GradScaler({.init_scale = -1}), "init_scale");
  EXPECT_THROW_WITH(GradScaler({.growth_interval = 0}), "growth_interval");
}

// A sharding strategy's agreement between ranks (set_found_inf_reducer): the
// reducer sees this process's flag after every check and its answer decides.
TEST(GradScaler, FoundInfReducerDecidesWhetherTheStepIsSkipped) {
  auto model = make_net(0);
  torch::optim::SGD optimizer(model->parameters(), 0.1);
  GradScaler scaler;
  std::vector<double> seen;
  double answer = 1;  // "another rank found an inf"
  scaler.set_found_inf_reducer([&](double local) {
    seen.push_back(local);
    return std::max(local, answer);  // the maximum over this rank and "the others"
  });
  const auto x = torch::randn({4, 6});
  const auto before = snapshot(*model);
  scaler.scale(model->forward(x).sum()).backward();
  EXPECT_FALSE(scaler.step(optimizer));  // local gradients are finite, the job's are not
  EXPECT_TRUE(scaler.last_step_skipped());
  scaler.update();
  EXPECT_EQ(scaler.get_scale(), 32768.0);
  const auto after_skip = snapshot(*model);
  for (size_t i = 0; i < before.size(); ++i) EXPECT_TRUE(torch::equal(before[i], after_skip[i]));
  ASSERT_EQ(seen, std::vector<double>({0.0}));
  // Agreeing on "clean": unscale_ (clipping) then step check once, and it steps.
  answer = 0;
  optimizer.zero_grad();
  scaler.scale(model->forward(x).sum()).backward();
  scaler.unscale_(optimizer);
  EXPECT_TRUE(scaler.step(optimizer));
  scaler.update();
  EXPECT_EQ(seen.size(), 2u);
  EXPECT_FALSE(torch::equal(after_skip[0], model->parameters()[0]));
  // A local inf is reported to the reducer.
  optimizer.zero_grad();
  scaler.scale(model->forward(x).sum() * std::numeric_limits<float>::infinity()).backward();
  EXPECT_FALSE(scaler.step(optimizer));
  EXPECT_EQ(seen.back(), 1.0);
  scaler.set_found_inf_reducer(nullptr);
  EXPECT_FALSE(scaler.has_found_inf_reducer());
}

// DeepSpeed's dynamic loss scaler (strategy="deepspeed" sets these options): the
// scale is lowered only at the hysteresis-th overflow in a row, never below
// min_scale, and a growth restores the hysteresis. Every overflow still skips.
TEST(GradScaler, HysteresisAndMinScaleFollowDeepSpeedsRule) {
  GradScalerOptions options;
  options.init_scale = 8;
  options.growth_interval = 3;
  options.hysteresis = 2;
  options.min_scale = 2;
  fabric::Fabric fabric({.accelerator = "cpu", .devices = 1,
                         .precision_plugin = std::make_shared<MixedPrecision>(
                             torch::kHalf, c10::kCPU, std::make_unique<GradScaler>(options))});
  auto model = make_net(0);
  auto optimizer = std::make_shared<torch::optim::SGD>(model->parameters(), 0.01);
  auto [net, opt] = fabric.setup(model, optimizer);
  auto* scaler = fabric.precision().scaler();
  ASSERT_NE(scaler, nullptr);
  auto x = torch::randn({16, 6}), y = torch::randn({16, 1});
  // (overflow?, the scale after the step), worked out from DeepSpeed's rule.
  const std::vector<std::pair<bool, double>> steps = {
      {true, 8},  {true, 4},  {true, 2},  {true, 2},   // hysteresis 2, then halving to the floor
      {false, 2}, {false, 2}, {false, 4},              // 3 clean steps: growth, hysteresis back to 2
      {true, 4},  {true, 2},  {false, 2}};
  for (size_t i = 0; i < steps.size(); ++i) {
    opt.zero_grad();
    fabric.backward(torch::mse_loss(net(x), y));
    if (steps[i].first) model->fc1->weight.mutable_grad()[0][0] = std::numeric_limits<float>::infinity();
    opt.step();
    EXPECT_EQ(scaler->last_step_skipped(), steps[i].first) << "step " << i;
    EXPECT_EQ(scaler->get_scale(), steps[i].second) << "step " << i;
  }
  EXPECT_THROW_WITH(scaler->set_options(options), "set_options() after scaling began");
}
