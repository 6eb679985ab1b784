// The fused optimizers against LibTorch's per-parameter ones (same data, 20
// steps: parameters and state within 1e-6), across checkpoints in both
// directions, and against Python's torch.optim.*(fused=True) on the same grads.
#include <cmath>
#include <fstream>
#include <functional>
#include <limits>
#include <regex>

#include <torch/torch.h>

#include "fabric/fabric.h"
#include "checkpoint/filesystem.h"
#include "optim/fused.h"
#include "precision/grad_scaler.h"
#include "test_util.h"

namespace {

// Parameters of several shapes, a deterministic start, and gradients that are a
// formula of the step (the same in the Python check).
std::vector<torch::Tensor> make_params(torch::Dtype dtype = torch::kFloat) {
  const std::vector<std::vector<int64_t>> shapes{{7, 5}, {5}, {3, 4, 2}, {1}, {64}};
  std::vector<torch::Tensor> params;
  int64_t offset = 0;
  for (const auto& shape : shapes) {
    int64_t n = 1;
    for (auto s : shape) n *= s;
    params.push_back((torch::arange(offset, offset + n, torch::kDouble) * 0.37).sin().to(dtype)
                         .reshape(shape).set_requires_grad(true));
    offset += n;
  }
  return params;
}

void set_grads(std::vector<torch::Tensor>& params, int step) {
  int64_t offset = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    auto& p = params[i];
    const int64_t n = p.numel();
    if (i == 3 && step % 4 == 1) {  // a parameter without a gradient on some steps
      p.mutable_grad() = torch::Tensor();
    } else {
      p.mutable_grad() = ((torch::arange(offset, offset + n, torch::kDouble) * 0.11 * (step + 1)).cos() * 0.1)
                             .to(p.scalar_type()).reshape(p.sizes());
    }
    offset += n;
  }
}

double max_diff(const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b) {
  double diff = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff = std::max(diff, (a[i].detach().to(torch::kDouble) - b[i].detach().to(torch::kDouble)).abs().max().item<double>());
  }
  return diff;
}

using Make = std::function<std::shared_ptr<torch::optim::Optimizer>(std::vector<torch::Tensor>)>;

std::vector<torch::Tensor> defined_grads(const std::vector<torch::Tensor>& params) {
  std::vector<torch::Tensor> grads;
  for (const auto& p : params) {
    if (p.grad().defined()) grads.push_back(p.grad());
  }
  return grads;
}

// 20 steps of both on the same grads; returns the largest parameter difference
// and checks the state tensors (by the Adam/SGD state types). `scaled`: each side
// steps through its own GradScaler (the fused side through the kernels'
// grad_scale/found_inf, the loop side unscaled first), the gradients multiplied by
// the current scale, with inf in a gradient at steps 0, 5 and 12.
void expect_same_run(const Make& fused, const Make& loop, torch::Dtype dtype = torch::kFloat,
                     bool scaled = false) {
  auto a = make_params(dtype), b = make_params(dtype);
  auto fa = fused(a), lb = loop(b);
  fabric::precision::GradScaler scaler_a({.init_scale = 1000.0, .growth_interval = 3}),
      scaler_b({.init_scale = 1000.0, .growth_interval = 3});
  scaler_a.scale(torch::ones({1}));  // the scale's device: the CPU
  scaler_b.scale(torch::ones({1}));
  int skipped = 0;
  for (int step = 0; step < 20; ++step) {
    set_grads(a, step);
    set_grads(b, step);
    if (!scaled) {
      fa->step();
      lb->step();
      continue;
    }
    ASSERT_EQ(scaler_a.get_scale(), scaler_b.get_scale());
    for (auto* side : {&a, &b}) {
      for (auto& g : defined_grads(*side)) g.mul_(scaler_a.get_scale());
      if (step == 0 || step == 5 || step == 12) {
        (*side)[0].grad().view({-1})[3] = std::numeric_limits<double>::infinity();
      }
    }
    const bool stepped_a = scaler_a.step(*fa), stepped_b = scaler_b.step(*lb);
    ASSERT_EQ(stepped_a, stepped_b) << "step " << step;
    skipped += stepped_a ? 0 : 1;
    // After a step both hold the unscaled gradients (the kernel wrote them back).
    if (stepped_a) {
      EXPECT_LE(max_diff(defined_grads(a), defined_grads(b)), 1e-6) << "step " << step;
    }
    scaler_a.update();
    scaler_b.update();
  }
  if (scaled) {
    EXPECT_EQ(skipped, 3);
    EXPECT_EQ(scaler_a.get_scale(), scaler_b.get_scale());
    EXPECT_NE(scaler_a.get_scale(), 1000.0) << "the scale never moved";
  }
  EXPECT_LE(max_diff(a, b), 1e-6);
  EXPECT_GT(max_diff(a, make_params(dtype)), 1e-3) << "nothing moved";
  for (size_t i = 0; i < a.size(); ++i) {
    const bool has_state = fa->state().count(a[i].unsafeGetTensorImpl()) > 0;
    EXPECT_EQ(has_state, lb->state().count(b[i].unsafeGetTensorImpl()) > 0);
    if (!has_state) continue;  // SGD without momentum keeps none
    auto& sa = *fa->state().at(a[i].unsafeGetTensorImpl());
    auto& sb = *lb->state().at(b[i].unsafeGetTensorImpl());
    if (auto adam = dynamic_cast<torch::optim::AdamParamState*>(&sa)) {
      auto& other = dynamic_cast<torch::optim::AdamParamState&>(sb);
      EXPECT_EQ(adam->step(), other.step());
      EXPECT_LE(max_diff({adam->exp_avg(), adam->exp_avg_sq()}, {other.exp_avg(), other.exp_avg_sq()}), 1e-6);
      EXPECT_EQ(adam->max_exp_avg_sq().defined(), other.max_exp_avg_sq().defined());
      if (adam->max_exp_avg_sq().defined()) {
        EXPECT_LE(max_diff({adam->max_exp_avg_sq()}, {other.max_exp_avg_sq()}), 1e-6);
      }
    } else if (auto adamw = dynamic_cast<torch::optim::AdamWParamState*>(&sa)) {
      auto& other = dynamic_cast<torch::optim::AdamWParamState&>(sb);
      EXPECT_EQ(adamw->step(), other.step());
      EXPECT_LE(max_diff({adamw->exp_avg(), adamw->exp_avg_sq()}, {other.exp_avg(), other.exp_avg_sq()}), 1e-6);
      EXPECT_EQ(adamw->max_exp_avg_sq().defined(), other.max_exp_avg_sq().defined());
      if (adamw->max_exp_avg_sq().defined()) {
        EXPECT_LE(max_diff({adamw->max_exp_avg_sq()}, {other.max_exp_avg_sq()}), 1e-6);
      }
    } else {
      auto& sgd = dynamic_cast<torch::optim::SGDParamState&>(sa);
      EXPECT_LE(max_diff({sgd.momentum_buffer()},
                         {dynamic_cast<torch::optim::SGDParamState&>(sb).momentum_buffer()}), 1e-6);
    }
  }
}

}  // namespace

TEST(FusedOptim, AdamMatchesLibTorchAdam) {
  for (const auto& options : {torch::optim::AdamOptions(1e-2), torch::optim::AdamOptions(1e-2).weight_decay(0.05),
                              torch::optim::AdamOptions(3e-3).amsgrad(true).betas({0.8, 0.99}).eps(1e-6)}) {
    SCOPED_TRACE(options.weight_decay());
    expect_same_run([&](auto p) { return std::make_shared<fabric::optim::FusedAdam>(p, options); },
                    [&](auto p) { return std::make_shared<torch::optim::Adam>(p, options); });
  }
  // double parameters take the same kernel
  expect_same_run(
      [](auto p) { return std::make_shared<fabric::optim::FusedAdam>(p, torch::optim::AdamOptions(1e-2)); },
      [](auto p) { return std::make_shared<torch::optim::Adam>(p, torch::optim::AdamOptions(1e-2)); },
      torch::kDouble);
}

TEST(FusedOptim, AdamWMatchesLibTorchAdamW) {
  for (const auto& options : {torch::optim::AdamWOptions(1e-2), torch::optim::AdamWOptions(1e-2).weight_decay(0.1).amsgrad(true)}) {
    expect_same_run([&](auto p) { return std::make_shared<fabric::optim::FusedAdamW>(p, options); },
                    [&](auto p) { return std::make_shared<torch::optim::AdamW>(p, options); });
  }
}

TEST(FusedOptim, SgdMatchesLibTorchSgd) {
  for (const auto& options : {torch::optim::SGDOptions(0.1), torch::optim::SGDOptions(0.05).momentum(0.9),
                              torch::optim::SGDOptions(0.05).momentum(0.9).nesterov(true).weight_decay(0.01),
                              torch::optim::SGDOptions(0.05).momentum(0.5).dampening(0.3)}) {
    SCOPED_TRACE(options.momentum());
    expect_same_run([&](auto p) { return std::make_shared<fabric::optim::FusedSGD>(p, options); },
                    [&](auto p) { return std::make_shared<torch::optim::SGD>(p, options); });
  }
}

// Float and double parameters in one group (two kernel calls), and two groups with
// their own learning rates.
TEST(FusedOptim, MixedDtypesAndGroupsMatchLibTorch) {
  auto make = [] {
    auto f = make_params(torch::kFloat), d = make_params(torch::kDouble);
    return std::vector<torch::Tensor>{f[0], d[1], f[2], d[3], f[4]};
  };
  auto groups = [](const std::vector<torch::Tensor>& p) {
    return std::vector<torch::optim::OptimizerParamGroup>{
        torch::optim::OptimizerParamGroup({p[0], p[1], p[2]}, std::make_unique<torch::optim::AdamOptions>(1e-2)),
        torch::optim::OptimizerParamGroup({p[3], p[4]}, std::make_unique<torch::optim::AdamOptions>(
                                                            torch::optim::AdamOptions(3e-2).weight_decay(0.1)))};
  };
  auto a = make(), b = make();
  fabric::optim::FusedAdam fused(groups(a));
  torch::optim::Adam loop(groups(b));
  for (int step = 0; step < 20; ++step) {
    set_grads(a, step);
    set_grads(b, step);
    fused.step();
    loop.step();
  }
  EXPECT_LE(max_diff(a, b), 1e-6);
  EXPECT_GT(max_diff(a, make()), 1e-3) << "nothing moved";
  EXPECT_EQ(a[1].scalar_type(), torch::kDouble);
}

TEST(FusedOptim, SparseGradientsAreRefused) {
  auto p = torch::zeros({4}, torch::requires_grad());
  fabric::optim::FusedAdam adam({p}, torch::optim::AdamOptions(0.1));
  p.mutable_grad() = torch::zeros({4}).to_sparse();
  EXPECT_THROW_WITH(adam.step(), "FusedAdam", "sparse");
}

// A fused optimizer's checkpoint continues in LibTorch's, and the other way round.
TEST(FusedOptim, CheckpointsCrossBetweenFusedAndLoop) {
  const auto dir = ::testing::TempDir() + "/fused_ckpt";
  fabric::fs::make_directories(dir);
  fabric::Fabric fabric({.accelerator = "cpu"});
  for (bool fused_first : {true, false}) {
    SCOPED_TRACE(fused_first);
    auto a = make_params();
    const auto options = torch::optim::AdamOptions(1e-2).weight_decay(0.01);
    std::shared_ptr<torch::optim::Optimizer> first =
        fused_first ? std::shared_ptr<torch::optim::Optimizer>(std::make_shared<fabric::optim::FusedAdam>(a, options))
                    : std::make_shared<torch::optim::Adam>(a, options);
    for (int step = 0; step < 5; ++step) {
      set_grads(a, step);
      first->step();
    }
    const auto path = dir + "/opt.pt";
    fabric.save(path, {{"optimizer", first}});
    // Both continue for 5 more steps: `first` itself and the other kind loaded from the file.
    auto b = make_params();
    for (size_t i = 0; i < a.size(); ++i) b[i].data().copy_(a[i].detach());
    std::shared_ptr<torch::optim::Optimizer> second =
        fused_first ? std::shared_ptr<torch::optim::Optimizer>(std::make_shared<torch::optim::Adam>(b, options))
                    : std::make_shared<fabric::optim::FusedAdam>(b, options);
    fabric::State state{{"optimizer", second}};
    fabric.load(path, state);
    for (int step = 5; step < 10; ++step) {
      set_grads(a, step);
      set_grads(b, step);
      first->step();
      second->step();
    }
    EXPECT_LE(max_diff(a, b), 1e-6);
  }
}

// torch.optim.Adam/AdamW/SGD(fused=True) in Python on the same start and grads.
TEST(FusedOptim, MatchesPythonFusedTrue) {
  const auto dir = ::testing::TempDir() + "/fused_python";
  fabric::fs::make_directories(dir);
  fabric::Fabric fabric({.accelerator = "cpu"});
  struct Case {
    std::string name, python;
    Make make;
  };
  const std::vector<Case> cases{
      {"adam", "torch.optim.Adam(p, lr=1e-2, weight_decay=0.05, amsgrad=True, fused=True)",
       [](auto p) { return std::make_shared<fabric::optim::FusedAdam>(p, torch::optim::AdamOptions(1e-2).weight_decay(0.05).amsgrad(true)); }},
      {"adamw", "torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, fused=True)",
       [](auto p) { return std::make_shared<fabric::optim::FusedAdamW>(p, torch::optim::AdamWOptions(1e-2).weight_decay(0.1)); }},
      {"sgd", "torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01, fused=True)",
       [](auto p) { return std::make_shared<fabric::optim::FusedSGD>(p, torch::optim::SGDOptions(0.05).momentum(0.9).nesterov(true).weight_decay(0.01)); }},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    auto params = make_params();
    auto optimizer = c.make(params);
    for (int step = 0; step < 20; ++step) {
      set_grads(params, step);
      optimizer->step();
    }
    fabric::State state{{"optimizer", optimizer}};
    for (size_t i = 0; i < params.size(); ++i) state.emplace("p" + std::to_string(i), params[i].detach());
    fabric.save(dir + "/" + c.name + ".pt", state);
    const std::string script = R"(import torch
shapes = [(7, 5), (5,), (3, 4, 2), (1,), (64,)]
p, offset = [], 0
for s in shapes:
    n = 1
    for d in s: n *= d
    p.append((torch.arange(offset, offset + n, dtype=torch.float64) * 0.37).sin().float().reshape(s).requires_grad_())
    offset += n
opt = )" + c.python + R"(
for step in range(20):
    offset = 0
    for i, t in enumerate(p):
        n = t.numel()
        t.grad = None if (i == 3 and step % 4 == 1) else ((torch.arange(offset, offset + n, dtype=torch.float64) * 0.11 * (step + 1)).cos() * 0.1).float().reshape(t.shape)
        offset += n
    opt.step()
ours = torch.load(')" + dir + "/" + c.name + R"(.pt', weights_only=True)
diff = max((ours['p%d' % i] - t.detach()).abs().max().item() for i, t in enumerate(p))
mine = opt.state_dict()['state']
state_diff = 0.0
for i in range(len(p)):
    for k, v in mine[i].items():
        if torch.is_tensor(v) and k != 'step':
            state_diff = max(state_diff, (ours['optimizer']['state'][i][k] - v).abs().max().item())
        elif k == 'step':
            assert float(ours['optimizer']['state'][i][k]) == float(v), (k, v)
print('param diff %.3g state diff %.3g' % (diff, state_diff))
)";
    std::ofstream(dir + "/" + c.name + ".py") << script;
    const auto result = testutil::run_command(testutil::python() + " " + dir + "/" + c.name + ".py");
    ASSERT_EQ(result.status, 0) << result.output;
    std::smatch match;
    ASSERT_TRUE(std::regex_search(result.output, match, std::regex("param diff (\\S+) state diff (\\S+)")))
        << result.output;
    EXPECT_LE(std::stod(match[1]), 1e-6) << result.output;
    EXPECT_LE(std::stod(match[2]), 1e-6) << result.output;
  }
}

// Loss scaling: the fused optimizers take the scale and the inf/nan flag into
// their kernels; parameters, state and step counts equal LibTorch's optimizers
// behind GradScaler's separate unscale (skipped steps, a skipped first step and
// scale changes included).
TEST(FusedOptim, GradScalerStepsThroughTheKernels) {
  expect_same_run(
      [](auto p) { return std::make_shared<fabric::optim::FusedAdam>(p, torch::optim::AdamOptions(1e-2).weight_decay(0.05)); },
      [](auto p) { return std::make_shared<torch::optim::Adam>(p, torch::optim::AdamOptions(1e-2).weight_decay(0.05)); },
      torch::kFloat, /*scaled=*/true);
  expect_same_run(
      [](auto p) { return std::make_shared<fabric::optim::FusedAdamW>(p, torch::optim::AdamWOptions(1e-2).amsgrad(true)); },
      [](auto p) { return std::make_shared<torch::optim::AdamW>(p, torch::optim::AdamWOptions(1e-2).amsgrad(true)); },
      torch::kFloat, /*scaled=*/true);
  expect_same_run(
      [](auto p) { return std::make_shared<fabric::optim::FusedSGD>(p, torch::optim::SGDOptions(0.05).momentum(0.9)); },
      [](auto p) { return std::make_shared<torch::optim::SGD>(p, torch::optim::SGDOptions(0.05).momentum(0.9)); },
      torch::kFloat, /*scaled=*/true);

  // prepare_step() only checks a fused optimizer's gradients (the kernel unscales
  // them) and unscales a per-parameter optimizer's; an explicit unscale_() (for
  // clipping) before a fused step is not undone or repeated.
  for (const bool fused : {true, false}) {
    auto params = make_params();
    set_grads(params, 2);
    const auto expected = params[0].grad().clone();
    std::shared_ptr<torch::optim::Optimizer> optimizer =
        fused ? std::shared_ptr<torch::optim::Optimizer>(std::make_shared<fabric::optim::FusedSGD>(params, torch::optim::SGDOptions(0.1)))
              : std::make_shared<torch::optim::SGD>(params, torch::optim::SGDOptions(0.1));
    fabric::precision::GradScaler scaler({.init_scale = 8.0});
    scaler.scale(torch::ones({1}));
    for (auto& g : defined_grads(params)) g.mul_(8.0);
    scaler.prepare_step(*optimizer);
    EXPECT_TRUE(torch::equal(params[0].grad(), fused ? expected * 8 : expected)) << fused;
    scaler.step(*optimizer);
    EXPECT_TRUE(torch::allclose(params[0].grad(), expected)) << fused;
  }
  // A flag summed over devices (2: inf on two of them) skips too: ATen's kernels
  // skip only on exactly 1.
  for (const bool adam : {true, false}) {
    auto params = make_params();
    const auto start = params[0].detach().clone();
    set_grads(params, 2);
    std::shared_ptr<fabric::precision::AmpScalingStep> optimizer;
    if (adam) {
      optimizer = std::make_shared<fabric::optim::FusedAdam>(params, torch::optim::AdamOptions(0.1));
    } else {
      optimizer = std::make_shared<fabric::optim::FusedSGD>(params, torch::optim::SGDOptions(0.1).momentum(0.9));
    }
    EXPECT_FALSE(optimizer->step_with_amp_scaling(torch::full({1}, 4.0), torch::full({1}, 2.0))) << adam;
    EXPECT_TRUE(torch::equal(params[0].detach(), start)) << adam;
    EXPECT_TRUE(optimizer->step_with_amp_scaling(torch::full({1}, 4.0), torch::zeros({1}))) << adam;
    EXPECT_FALSE(torch::equal(params[0].detach(), start)) << adam;
  }
  auto params = make_params();
  const auto start = params[0].detach().clone();
  set_grads(params, 2);
  const auto grad = params[0].grad().clone();
  fabric::optim::FusedSGD optimizer(params, torch::optim::SGDOptions(0.1));
  fabric::precision::GradScaler scaler({.init_scale = 8.0});
  scaler.scale(torch::ones({1}));
  for (auto& g : defined_grads(params)) g.mul_(8.0);
  scaler.unscale_(optimizer);
  scaler.step(optimizer);
  EXPECT_TRUE(torch::allclose(params[0].detach(), start - 0.1 * grad));
}
