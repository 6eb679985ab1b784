// DeepSpeed's ZeRO stages (torchfabric's implementation) against DDP on the CPU:
// the GPT example's training step (AdamW, fp32) at 2 ranks, same model, data,
// seed and threads, the strategies interleaved in one run (ddp, stage 1, 2, 3,
// fsdp, ddp, ...) and the medians compared.
//   deepspeed_bench                    runs the comparison
//   deepspeed_bench --worker ...       one strategy (started by the driver)
// Per-rank memory: the distinct storage bytes of parameters, gradients and
// optimizer state (the module's and the optimizer's tensors: pieces, masters)
// after a backward, before the step, where ZeRO's gradient partitioning shows.
// Last lines:
//   deepspeed_stage_N/ddp per-rank memory: X   (N = 1, 2, 3; expect ~0.75, 0.625, 0.5)
//   deepspeed_stage_N/ddp step time: X
//   deepspeed_stage_2/fsdp step time: X
#include <torch/torch.h>

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <chrono>
#include <iomanip>
#include <iostream>
#include <map>
#include <regex>
#include <set>
#include <thread>

#include <boost/program_options.hpp>

#include "benchmarks/common/median.h"
#include "benchmarks/common/run_command.h"
#include "cli.h"
#include "data.h"
#include "fabric/fabric.h"
#include "model.h"
#include "optim/codec.h"
#include "strategies/strategy.h"

namespace {

struct Config {
  GptConfig gpt;
  int64_t batch = 8;
  int steps = 10;
  int cores = 2;
};

// Parameters and gradients of the module and of the optimizer, and the
// optimizer's state, each storage once.
int64_t held_bytes(torch::nn::Module& module, torch::optim::Optimizer& optimizer) {
  std::set<const void*> seen;
  int64_t bytes = 0;
  const auto count = [&](const at::Tensor& t) {
    if (!t.defined() || t.numel() == 0) return;
    if (seen.insert(t.storage().unsafeGetStorageImpl()).second) bytes += static_cast<int64_t>(t.storage().nbytes());
  };
  for (const auto& p : module.parameters()) count(p), count(p.grad());
  const auto& codec = fabric::optim::codec_for(optimizer.defaults());
  for (const auto& p : fabric::strategies::optimizer_parameters(optimizer)) {
    count(p), count(p.grad());
    auto it = optimizer.state().find(p.unsafeGetTensorImpl());
    if (it == optimizer.state().end()) continue;
    for (const auto* slot : codec.per_element_state(*it->second)) count(*slot);
  }
  return bytes;
}

int worker(const std::string& strategy, const Config& config) {
  fabric::Fabric fabric({.accelerator = "cpu", .strategy = strategy, .devices = 2});
  fabric.launch();
  torch::set_num_threads(std::max(1, config.cores / static_cast<int>(fabric.world_size())));
  torch::manual_seed(0);
  auto model = std::make_shared<GptImpl>(config.gpt);
  const int64_t n_params = model->num_parameters();
  auto optimizer = std::make_shared<torch::optim::AdamW>(model->parameters(), 1e-3);
  auto [net, opt] = fabric.setup(model, optimizer);
  auto text = load_fortunes();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(1000 + fabric.global_rank());
  int64_t bytes = 0;
  auto step = [&, &net = net, &opt = opt](bool measure) {
    auto [x, y] = get_batch(text, config.batch, config.gpt.block_size, gen);
    opt.zero_grad();
    auto logits = net(x);
    fabric.backward(torch::cross_entropy_loss(logits.view({-1, config.gpt.vocab_size}), y.view({-1})));
    if (measure) bytes = held_bytes(*model, *optimizer);
    opt.step();
  };
  for (int i = 0; i < 3; ++i) step(i == 2);  // (state exists from the first step on)
  fabric.barrier();
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < config.steps; ++i) step(false);
  fabric.barrier();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / config.steps;
  const double most = fabric.all_reduce(static_cast<double>(bytes), "max");
  fabric.print(std::fixed, std::setprecision(4), strategy, ": ", n_params, " parameters, ",
               fabric.world_size(), " ranks x ", torch::get_num_threads(), " threads, step time: ",
               seconds, " s, per-rank bytes after backward: ", static_cast<int64_t>(most));
  return 0;
}

std::pair<double, double> run_worker(const std::string& self, const std::string& strategy,
                                     const std::string& flags) {
  const std::string cmd = self + " --worker --strategy " + strategy + flags;
  const auto [status, output] = benchmarks::run_command(cmd);
  std::cout << output << std::flush;
  std::smatch m;
  if (status != 0 ||
      !std::regex_search(output, m, std::regex("step time: ([0-9.]+) s, per-rank bytes after backward: ([0-9]+)"))) {
    throw std::runtime_error("benchmark worker failed: " + cmd);
  }
  return {std::stod(m[1]), std::stod(m[2])};
}

}  // namespace

int main(int argc, char** argv) {
  namespace po = boost::program_options;
  Config config;
  config.gpt.n_layer = 6;
  config.gpt.n_embd = 192;
  config.gpt.n_head = 6;
  config.gpt.block_size = 64;
  config.cores = static_cast<int>(std::max(2u, std::thread::hardware_concurrency()));
  std::string strategy;
  int rounds = 3;
  po::options_description flags("deepspeed/ddp benchmark (GPT example, 2 CPU ranks)");
  flags.add_options()("help,h", "show this help")
      ("worker", "run one strategy (internal)")
      ("strategy", po::value(&strategy), "the strategy (with --worker)")
      ("n-layer", po::value(&config.gpt.n_layer)->default_value(config.gpt.n_layer), "blocks")
      ("n-embd", po::value(&config.gpt.n_embd)->default_value(config.gpt.n_embd), "width")
      ("n-head", po::value(&config.gpt.n_head)->default_value(config.gpt.n_head), "heads")
      ("block-size", po::value(&config.gpt.block_size)->default_value(config.gpt.block_size), "context")
      ("batch-size", po::value(&config.batch)->default_value(config.batch), "per-rank batch")
      ("steps", po::value(&config.steps)->default_value(config.steps), "timed steps per run")
      ("rounds", po::value(&rounds)->default_value(rounds), "rounds of every strategy")
      ("cores", po::value(&config.cores)->default_value(config.cores), "cores split between the ranks");
  po::variables_map vm;
  examples::parse_flags(flags, argc, argv, vm);
  try {
    if (vm.count("worker")) return worker(strategy, config);
    const std::string forwarded =
        " --n-layer " + std::to_string(config.gpt.n_layer) + " --n-embd " +
        std::to_string(config.gpt.n_embd) + " --n-head " + std::to_string(config.gpt.n_head) +
        " --block-size " + std::to_string(config.gpt.block_size) + " --batch-size " +
        std::to_string(config.batch) + " --steps " + std::to_string(config.steps) + " --cores " +
        std::to_string(config.cores);
    const std::vector<std::string> strategies = {"ddp", "deepspeed_stage_1", "deepspeed_stage_2",
                                                 "deepspeed_stage_3", "fsdp"};
    std::map<std::string, std::vector<double>> time, memory;
    for (int r = 0; r < rounds; ++r) {
      for (const auto& s : strategies) {
        auto [t, m] = run_worker(argv[0], s, forwarded);
        time[s].push_back(t);
        memory[s].push_back(m);
      }
    }
    const auto med = [](const std::vector<double>& v) { return benchmarks::median(v); };
    std::cout << std::fixed << std::setprecision(3);
    for (const char* stage : {"1", "2", "3"}) {
      const std::string s = std::string("deepspeed_stage_") + stage;
      std::cout << s << "/ddp per-rank memory: " << med(memory[s]) / med(memory["ddp"]) << "\n";
    }
    for (const char* stage : {"1", "2", "3"}) {
      const std::string s = std::string("deepspeed_stage_") + stage;
      std::cout << s << "/ddp step time: " << med(time[s]) / med(time["ddp"]) << "\n";
    }
    std::cout << "deepspeed_stage_2/fsdp step time: " << med(time["deepspeed_stage_2"]) / med(time["fsdp"])
              << std::endl;
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << std::endl;
    return 1;
  }
}
