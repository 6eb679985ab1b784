// What the GPU check measures (scripts/gpu_check.sh), each figure a ratio against
// a reference measured in the same run, one fresh process per measurement:
//   gpt bf16-mixed: torchfabric X tokens/s, lightning Y tokens/s
//   torchfabric/lightning tokens/s: R         (gpt_lightning.py: the Python twin)
//   torchfabric MFU: M (of 790 TFLOP/s dense bf16, 6N + 12·L·C·T FLOPs per token)
//   ddp/single_device step time: X            (NCCL, world size 1)
//   fsdp/single_device step time: X
//   gpu checkpoint loaded on cpu: equal (N tensors)
// The model is examples/gpt's GptImpl (GPT-2 small's shape, byte vocabulary) on
// random token windows kept on the device, AdamW, bf16-mixed. Without a GPU it
// says so and exits 0; --smoke runs the same code on the CPU, tiny, so that a
// GPU machine's few minutes never find a bug in this program.
//   gpu_bench [--smoke] [--python python3] [--script benchmarks/gpu/gpt_lightning.py]
//   gpu_bench --worker --strategy S [--smoke] [--save PATH]   (one measurement)
#include <torch/cuda.h>
#include <torch/torch.h>

#include <chrono>
#include <cstdio>
#include <iomanip>
#include <iostream>

#include <boost/program_options.hpp>

#include "benchmarks/common/run_command.h"
#include "cli.h"
#include "checkpoint/checkpoint.h"
#include "fabric/fabric.h"
#include "launchers/mpirun.h"
#include "examples/gpt/model.h"

namespace {

constexpr double kPeakFlops = 790e12;  // H200, dense bf16

struct Shape {
  GptConfig config;
  int64_t batch;
  int steps;
};

Shape shape(bool smoke) {
  Shape s;
  if (smoke) {
    s.config.block_size = 32, s.config.n_layer = 2, s.config.n_head = 2, s.config.n_embd = 64;
    s.batch = 4, s.steps = 5;
  } else {  // GPT-2 small's widths, a byte vocabulary, 256-token windows
    s.config.block_size = 256, s.config.n_layer = 12, s.config.n_head = 12, s.config.n_embd = 768;
    s.batch = 32, s.steps = 30;
  }
  return s;
}

std::string flags_of(const Shape& s) {
  const auto& c = s.config;
  return " --n-layer " + std::to_string(c.n_layer) + " --n-head " + std::to_string(c.n_head) +
         " --n-embd " + std::to_string(c.n_embd) + " --block-size " + std::to_string(c.block_size) +
         " --batch-size " + std::to_string(s.batch) + " --steps " + std::to_string(s.steps);
}

// One measurement: seconds per training step after a warm-up; the model saved
// to `save` (fabric.save) and a checksum of its parameters printed, when asked.
int worker(const std::string& strategy, bool smoke, const std::string& save) {
  const Shape s = shape(smoke);
  fabric::FabricOptions options;
  options.accelerator = smoke ? "cpu" : "cuda";
  options.devices = 1;
  options.strategy = strategy;
  options.precision = "bf16-mixed";
  fabric::Fabric fabric(options);
  fabric.launch();
  torch::manual_seed(0);
  auto model = std::make_shared<GptImpl>(s.config);
  auto optimizer = std::make_shared<torch::optim::AdamW>(model->parameters(), torch::optim::AdamWOptions(3e-4));
  auto [net, opt] = fabric.setup(model, optimizer);
  const int64_t windows = 64;
  auto data = fabric.to_device(torch::randint(0, s.config.vocab_size, {windows, s.config.block_size + 1}));
  const bool cuda = options.accelerator == "cuda";
  int64_t at = 0;
  auto step = [&, &net = net, &opt = opt] {
    auto idx = torch::arange(at, at + s.batch, data.options()).remainder(windows);
    at += s.batch;
    auto window = data.index_select(0, idx);
    auto x = window.narrow(1, 0, s.config.block_size), y = window.narrow(1, 1, s.config.block_size);
    opt.zero_grad();
    auto logits = net(x);
    fabric.backward(torch::cross_entropy_loss(logits.reshape({-1, logits.size(-1)}), y.reshape({-1})));
    opt.step();
  };
  for (int i = 0; i < std::max(3, s.steps / 5); ++i) step();
  if (cuda) torch::cuda::synchronize();
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < s.steps; ++i) step();
  if (cuda) torch::cuda::synchronize();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / s.steps;
  std::cout << std::setprecision(9) << "seconds/step: " << seconds << std::endl;
  if (!save.empty()) {
    fabric.save(save, {{"model", net}});
    double sum = 0;
    for (const auto& p : model->parameters()) sum += p.detach().to(torch::kCPU, torch::kDouble).sum().item<double>();
    std::cout << std::setprecision(17) << "checksum: " << sum << std::endl;
  }
  return 0;
}

}  // namespace

int run(int argc, char** argv) {
  namespace po = boost::program_options;
  bool smoke = false, is_worker = false;
  std::string python = "python3", script = "benchmarks/gpu/gpt_lightning.py", strategy = "single_device", save;
  po::options_description flags("torchfabric's GPU measurements (see the header of benchmarks/gpu/main.cpp)\n\nOptions");
  flags.add_options()("help,h", "show this help and exit")
      ("smoke", po::bool_switch(&smoke), "the same code on the CPU, tiny (no GPU needed)")
      ("python", po::value(&python)->default_value(python), "python3 with torch and lightning")
      ("script", po::value(&script)->default_value(script), "the Python twin")
      ("worker", po::bool_switch(&is_worker), "one measurement (internal)")
      ("strategy", po::value(&strategy)->default_value(strategy), "with --worker: single_device, ddp or fsdp")
      ("save", po::value(&save), "with --worker: save the model there and print its checksum");
  po::variables_map vm;
  examples::parse_flags(flags, argc, argv, vm);
  if (is_worker) return worker(strategy, smoke, save);
  if (!smoke && !torch::cuda::is_available()) {
    std::cout << "gpu bench: no GPU (LibTorch sees no CUDA device); nothing measured (--smoke runs it on the CPU)"
              << std::endl;
    return 0;
  }
  const Shape s = shape(smoke);
  const std::string self = fabric::launchers::own_command_line().front() + (smoke ? " --smoke" : "");
  const std::string where = smoke ? "cpu" : "cuda";
  const std::string path = (smoke ? std::string("build") : std::string("/tmp")) + "/gpu_bench_" +
                           std::to_string(::getpid()) + ".ckpt";

  // GPT: torchfabric single_device (saving its model), then the Python twin.
  const std::string single_command = self + " --worker --strategy single_device --save " + path;
  const auto single = benchmarks::run_command(single_command);
  const double ours = benchmarks::figure(single, "seconds/step", single_command);
  const double saved_checksum = benchmarks::figure(single, "checksum", single_command);
  const double theirs = benchmarks::figure(python + " " + script + " --accelerator " + where + flags_of(s), "seconds/step");
  const double tokens = static_cast<double>(s.batch * s.config.block_size);
  GptImpl probe(s.config);
  const double n = static_cast<double>(probe.num_parameters() - probe.wpe->weight.numel());
  const double flops_per_token = 6 * n + 12.0 * s.config.n_layer * s.config.n_embd * s.config.block_size;
  std::cout << std::fixed << std::setprecision(1) << "gpt bf16-mixed " << where << " (" << n / 1e6
            << "M parameters, batch " << s.batch << " x " << s.config.block_size << "): torchfabric "
            << std::setprecision(0) << tokens / ours << " tokens/s, lightning " << tokens / theirs << " tokens/s" << std::endl;
  std::cout << std::setprecision(3) << "torchfabric/lightning tokens/s: " << theirs / ours << std::endl;
  std::cout << std::setprecision(4) << "torchfabric MFU: " << flops_per_token * tokens / ours / kPeakFlops
            << " (of 790 TFLOP/s dense bf16" << (smoke ? "; a CPU smoke run, meaningless" : "") << ")" << std::endl;

  // DDP and FSDP at world size 1 against single_device.
  for (const std::string strategy_name : {"ddp", "fsdp"}) {
    const double t = benchmarks::figure(self + " --worker --strategy " + strategy_name, "seconds/step");
    std::cout << std::setprecision(3) << strategy_name << "/single_device step time: " << t / ours << std::endl;
  }

  // The checkpoint written from the GPU, loaded into a model on the CPU.
  auto cpu = std::make_shared<GptImpl>(s.config);
  fabric::State state{{"model", cpu}};
  fabric::load_checkpoint(path, state);
  double sum = 0;
  for (const auto& p : cpu->parameters()) sum += p.detach().to(torch::kDouble).sum().item<double>();
  const double expected = saved_checksum;
  std::remove(path.c_str());
  if (sum != expected) {
    std::cout << std::setprecision(17) << "gpu checkpoint loaded on cpu: DIFFERENT (checksum " << sum
              << ", written " << expected << ")" << std::endl;
    return 1;
  }
  std::cout << "gpu checkpoint loaded on cpu: equal (" << cpu->parameters().size() << " tensors, checksum "
            << std::setprecision(6) << sum << ")" << std::endl;
  return 0;
}

int main(int argc, char** argv) { return examples::run_main(run, argc, argv); }
