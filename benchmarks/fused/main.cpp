// Fused optimizer steps (optim/fused.h) against LibTorch's per-parameter loops
// on the GPT example's parameters (8 blocks by default: 100+ tensors), in one
// process, the two alternated round by round and the medians compared:
//   fused/loop adam step time: X     (the optimizer step alone, same gradients)
//   fused/loop adamw step time: X
//   fused/loop sgd step time: X      (momentum 0.9)
//   fused/loop gpt steps/s: X        (whole training steps with AdamW)
//   in-kernel/separate unscale adam step time: X  (FusedAdam behind a GradScaler:
//       the scale handed to the kernel against unscale_() first, a pass of its own)
#include <torch/torch.h>

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <chrono>
#include <functional>
#include <iomanip>
#include <iostream>

#include <boost/program_options.hpp>
#include <torch/cuda.h>

#include "benchmarks/common/median.h"
#include "cli.h"
#include "data.h"
#include "model.h"
#include "optim/fused.h"
#include "precision/grad_scaler.h"

namespace {

torch::Device g_device = torch::kCPU;

// Waits for queued GPU work, so timings cover it.
void sync() {
  if (g_device.is_cuda()) torch::cuda::synchronize();
}

double seconds_of(const std::function<void()>& work, int repeats) {
  sync();
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < repeats; ++i) work();
  sync();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / repeats;
}

using Make = std::function<std::shared_ptr<torch::optim::Optimizer>(std::vector<torch::Tensor>)>;

// Copies of the model's parameters, each with a small random gradient.
std::vector<torch::Tensor> copy_with_grads(Gpt& model) {
  std::vector<torch::Tensor> params;
  for (auto& p : model->parameters()) {
    auto q = p.detach().clone().set_requires_grad(true);
    q.mutable_grad() = torch::randn_like(q) * 1e-3;
    params.push_back(q);
  }
  return params;
}

// Step time of `fused` over `loop` on copies of the model's parameters with
// the same gradients.
double step_ratio(const std::string& name, Gpt& model, const Make& loop, const Make& fused,
                  int steps, int rounds) {
  auto loop_opt = loop(copy_with_grads(model)), fused_opt = fused(copy_with_grads(model));
  loop_opt->step();  // state allocated before timing
  fused_opt->step();
  std::vector<double> loop_times, fused_times;
  for (int r = 0; r < rounds; ++r) {
    loop_times.push_back(seconds_of([&] { loop_opt->step(); }, steps));
    fused_times.push_back(seconds_of([&] { fused_opt->step(); }, steps));
  }
  const double l = benchmarks::median(loop_times), f = benchmarks::median(fused_times);
  std::cout << std::fixed << std::setprecision(3) << name << ": loop " << l * 1e3 << " ms, fused "
            << f * 1e3 << " ms per step" << std::endl;
  return f / l;
}

// FusedAdam behind a GradScaler (scale 1024), the gradients multiplied by the
// scale before each step as a scaled backward leaves them: the kernel unscaling
// them (GradScaler::step) against unscale_() first and the kernel without a scale.
double scaled_ratio(Gpt& model, int steps, int rounds) {
  struct Side {
    std::vector<torch::Tensor> params, grads;
    std::shared_ptr<fabric::optim::FusedAdam> optimizer;
    fabric::precision::GradScaler scaler{{.init_scale = 1024.0}};
  };
  auto make = [&] {
    auto side = std::make_unique<Side>();
    side->params = copy_with_grads(model);
    for (auto& q : side->params) side->grads.push_back(q.grad());
    side->optimizer = std::make_shared<fabric::optim::FusedAdam>(side->params, torch::optim::AdamOptions(1e-3));
    side->scaler.scale(torch::ones({1}, g_device));
    return side;
  };
  auto in_kernel = make(), separate = make();
  auto step = [](Side& side, bool unscale_first) {
    torch::_foreach_mul_(side.grads, 1024.0);
    if (unscale_first) side.scaler.unscale_(*side.optimizer);
    side.scaler.step(*side.optimizer);
    side.scaler.update();
  };
  step(*in_kernel, false);
  step(*separate, true);
  std::vector<double> kernel_times, separate_times;
  for (int r = 0; r < rounds; ++r) {
    kernel_times.push_back(seconds_of([&] { step(*in_kernel, false); }, steps));
    separate_times.push_back(seconds_of([&] { step(*separate, true); }, steps));
  }
  const double k = benchmarks::median(kernel_times), s = benchmarks::median(separate_times);
  std::cout << std::fixed << std::setprecision(3) << "adam with loss scaling: separate unscale " << s * 1e3
            << " ms, in-kernel " << k * 1e3 << " ms per step" << std::endl;
  return k / s;
}

}  // namespace

int run(int argc, char** argv) {
  namespace po = boost::program_options;
  GptConfig config;
  config.n_layer = 8;
  int steps = 20, rounds = 5;
  int64_t batch = 8;
  std::string device = "cpu";
  po::options_description flags("Fused optimizer steps against LibTorch's loops\n\nOptions");
  flags.add_options()("help,h", "show this help and exit")
      ("n-layer", po::value(&config.n_layer)->default_value(config.n_layer), "GPT blocks")
      ("steps", po::value(&steps)->default_value(steps), "steps per round")
      ("rounds", po::value(&rounds)->default_value(rounds), "rounds (medians reported)")
      ("batch-size", po::value(&batch)->default_value(batch), "GPT batch size for the end-to-end steps")
      ("device", po::value(&device)->default_value(device), "cpu or cuda");
  po::variables_map vm;
  examples::parse_flags(flags, argc, argv, vm);
  if (steps < 1 || rounds < 1 || batch < 1 || config.n_layer < 1) {
    std::cerr << "error: --steps, --rounds, --batch-size and --n-layer must be at least 1" << std::endl;
    return 2;
  }
  if (device != "cpu" && device != "cuda") {
    std::cerr << "error: --device must be cpu or cuda, got '" << device << "'" << std::endl;
    return 2;
  }
  if (device == "cuda" && !torch::cuda::is_available()) {
    std::cerr << "error: --device cuda, but LibTorch sees no CUDA GPU" << std::endl;
    return 2;
  }
  g_device = torch::Device(device);
  torch::manual_seed(0);
  Gpt model(config);
  model->to(g_device);
  std::cout << "gpt: " << model->num_parameters() << " parameters in " << model->parameters().size()
            << " tensors on " << g_device << ", " << torch::get_num_threads() << " threads" << std::endl;

  using namespace torch::optim;
  using fabric::optim::FusedAdam;
  using fabric::optim::FusedAdamW;
  using fabric::optim::FusedSGD;
  const double adam = step_ratio(
      "adam", model, [](auto p) { return std::make_shared<Adam>(p, AdamOptions(1e-3)); },
      [](auto p) { return std::make_shared<FusedAdam>(p, AdamOptions(1e-3)); }, steps, rounds);
  const double adamw = step_ratio(
      "adamw", model, [](auto p) { return std::make_shared<AdamW>(p, AdamWOptions(1e-3).weight_decay(0.01)); },
      [](auto p) { return std::make_shared<FusedAdamW>(p, AdamWOptions(1e-3).weight_decay(0.01)); }, steps,
      rounds);
  const double sgd = step_ratio(
      "sgd", model, [](auto p) { return std::make_shared<SGD>(p, SGDOptions(1e-2).momentum(0.9)); },
      [](auto p) { return std::make_shared<FusedSGD>(p, SGDOptions(1e-2).momentum(0.9)); }, steps, rounds);

  const double scaled = scaled_ratio(model, steps, rounds);

  // Whole training steps: two identical models, AdamW loop vs fused.
  auto text = load_fortunes();
  auto train = [&](const Make& make) {
    torch::manual_seed(0);
    auto net = std::make_shared<GptImpl>(config);
    net->to(g_device);
    auto optimizer = make(net->parameters());
    auto gen = at::make_generator<at::CPUGeneratorImpl>(1);
    return [=]() mutable {
      auto [x, y] = get_batch(text, batch, config.block_size, gen);
      optimizer->zero_grad();
      auto logits = net->forward(x.to(g_device));
      torch::cross_entropy_loss(logits.view({-1, config.vocab_size}), y.to(g_device).view({-1})).backward();
      optimizer->step();
    };
  };
  auto loop_step = train([](auto p) { return std::make_shared<AdamW>(p, AdamWOptions(1e-3).weight_decay(0.01)); });
  auto fused_step = train([](auto p) { return std::make_shared<FusedAdamW>(p, AdamWOptions(1e-3).weight_decay(0.01)); });
  loop_step();
  fused_step();
  std::vector<double> loop_times, fused_times;
  const int train_steps = std::max(1, steps / 4);
  for (int r = 0; r < rounds; ++r) {
    loop_times.push_back(seconds_of(loop_step, train_steps));
    fused_times.push_back(seconds_of(fused_step, train_steps));
  }
  const double loop_rate = 1 / benchmarks::median(loop_times), fused_rate = 1 / benchmarks::median(fused_times);
  std::cout << std::fixed << std::setprecision(2) << "gpt training: loop " << loop_rate
            << " steps/s, fused " << fused_rate << " steps/s" << std::endl;
  std::cout << std::setprecision(3) << "fused/loop adam step time: " << adam << "\n"
            << "fused/loop adamw step time: " << adamw << "\n"
            << "fused/loop sgd step time: " << sgd << "\n"
            << "fused/loop gpt steps/s: " << fused_rate / loop_rate << "\n"
            << "in-kernel/separate unscale adam step time: " << scaled << std::endl;
  return 0;
}

int main(int argc, char** argv) { return examples::run_main(run, argc, argv); }
