// FSDP and tensor parallelism against DDP on the CPU: the GPT example's
// training step (examples/gpt, every block a sharding unit) at 2 ranks, same
// model, data, seed and threads (the cores split between the ranks), the
// strategies interleaved in one run (ddp, fsdp, model_parallel, ddp, ...) and
// the medians compared. model_parallel is tensor_parallel_size 2 (attention
// heads, MLP, embedding and head split over both ranks, fsdp on a data-parallel
// dimension of 1), on the same global batch (so each data-parallel rank takes
// twice the per-rank batch). On 2 CPU cores its step time is for information (its
// all-reduces of activations, four per block per step, run on the same cores
// that compute); the GPU check measures it for real.
//   fsdp                    runs the comparison
//   fsdp --worker ...       one strategy (started by the driver)
// Per-rank memory is the distinct storage bytes of parameters, gradients and
// AdamW state at rest (between steps). Last lines:
//   fsdp/ddp per-rank memory: X
//   fsdp/ddp step time: X
//   model_parallel/ddp per-rank memory: X
//   model_parallel/ddp step time: X
#include <torch/torch.h>

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iomanip>
#include <iostream>
#include <regex>
#include <thread>

#include <boost/program_options.hpp>

#include "benchmarks/common/median.h"
#include "benchmarks/common/run_command.h"
#include "cli.h"
#include "optim/state_bytes.h"

#include "data.h"
#include "fabric/fabric.h"
#include "model.h"

namespace {

struct Config {
  GptConfig gpt;
  int64_t batch = 8;
  int steps = 10;
  int cores = 2;
};

int worker(const std::string& strategy, const Config& config) {
  fabric::FabricOptions options{.accelerator = "cpu", .strategy = strategy, .devices = 2};
  options.model_parallel.tensor_parallel_size = 2;
  fabric::Fabric fabric(options);
  fabric.launch();
  torch::set_num_threads(std::max(1, config.cores / static_cast<int>(fabric.world_size())));
  torch::manual_seed(0);
  auto model = std::make_shared<GptImpl>(config.gpt, fabric::tp::tensor_parallel_group(fabric.strategy()));
  const int64_t n_params = model->num_parameters();
  auto optimizer = std::make_shared<torch::optim::AdamW>(model->parameters(), 1e-3);
  auto [net, opt] = fabric.setup(model, optimizer);
  auto text = load_fortunes();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(1000 + fabric.strategy().data_parallel_rank());
  // The same global batch per step for every strategy: tensor-parallel peers
  // share their batch, so each data-parallel rank takes tp times the per-rank one.
  const int64_t batch = config.batch * fabric.world_size() / fabric.strategy().data_parallel_size();
  auto step = [&, &net = net, &opt = opt] {
    auto [x, y] = get_batch(text, batch, config.gpt.block_size, gen);
    opt.zero_grad();
    fabric.backward(model->loss(net(x), y));
    opt.step();
  };
  for (int i = 0; i < 3; ++i) step();
  fabric.barrier();
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < config.steps; ++i) step();
  fabric.barrier();
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / config.steps;
  const double bytes =
      fabric.all_reduce(static_cast<double>(fabric::optim::state_bytes(*optimizer)), "max");
  fabric.print(std::fixed, std::setprecision(4), strategy, ": ", n_params, " parameters, ",
               fabric.world_size(), " ranks x ", torch::get_num_threads(), " threads, step time: ",
               seconds, " s, per-rank state bytes: ", static_cast<int64_t>(bytes));
  return 0;
}

std::pair<double, double> run_worker(const std::string& self, const std::string& strategy,
                                     const std::string& flags) {
  const std::string cmd = self + " --worker --strategy " + strategy + flags;
  const auto [status, output] = benchmarks::run_command(cmd);
  std::cout << output << std::flush;
  std::smatch m;
  if (status != 0 || !std::regex_search(output, m, std::regex("step time: ([0-9.]+) s, per-rank state bytes: ([0-9]+)"))) {
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
  po::options_description flags("fsdp/ddp benchmark (GPT example, 2 CPU ranks)");
  flags.add_options()("help,h", "show this help")
      ("worker", "run one strategy (internal)")
      ("strategy", po::value(&strategy), "ddp, fsdp or model_parallel (with --worker)")
      ("n-layer", po::value(&config.gpt.n_layer)->default_value(config.gpt.n_layer), "blocks")
      ("n-embd", po::value(&config.gpt.n_embd)->default_value(config.gpt.n_embd), "width")
      ("n-head", po::value(&config.gpt.n_head)->default_value(config.gpt.n_head), "heads")
      ("block-size", po::value(&config.gpt.block_size)->default_value(config.gpt.block_size), "context")
      ("batch-size", po::value(&config.batch)->default_value(config.batch), "per-rank batch")
      ("steps", po::value(&config.steps)->default_value(config.steps), "timed steps per run")
      ("rounds", po::value(&rounds)->default_value(rounds), "ddp/fsdp/model_parallel triples")
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
    std::vector<double> ddp_time, fsdp_time, mp_time, ddp_mem, fsdp_mem, mp_mem;
    for (int r = 0; r < rounds; ++r) {
      auto [dt, dm] = run_worker(argv[0], "ddp", forwarded);
      auto [ft, fm] = run_worker(argv[0], "fsdp", forwarded);
      auto [mt, mm] = run_worker(argv[0], "model_parallel", forwarded);
      ddp_time.push_back(dt), ddp_mem.push_back(dm), fsdp_time.push_back(ft), fsdp_mem.push_back(fm);
      mp_time.push_back(mt), mp_mem.push_back(mm);
    }
    const double ddp_m = benchmarks::median(ddp_mem), ddp_t = benchmarks::median(ddp_time);
    std::cout << std::fixed << std::setprecision(3)
              << "fsdp/ddp per-rank memory: " << benchmarks::median(fsdp_mem) / ddp_m << "\n"
              << "fsdp/ddp step time: " << benchmarks::median(fsdp_time) / ddp_t << "\n"
              << "model_parallel/ddp per-rank memory: " << benchmarks::median(mp_mem) / ddp_m << "\n"
              << "model_parallel/ddp step time: " << benchmarks::median(mp_time) / ddp_t << std::endl;
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << std::endl;
    return 1;
  }
}
