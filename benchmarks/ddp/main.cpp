// DDP scaling on the CPU: training throughput of the classifier MLP, the same
// per-rank batch, and how much of the gradient all-reduce time ran while backward
// was still computing (the overlap DDP's bucketing is for).
//   ddp scaling 2x1-thread/1x1-thread: X   equal resources per rank (the standard
//       way): 2 ranks of 1 thread against 1 rank of 1 thread; ideal 2.0
//   ddp 2-rank/1-rank throughput: X        2 ranks of 1 thread against 1 rank with
//       --cores threads (default: every core; on the 2-core machine, 2 threads)
// Each configuration runs --rounds times, alternated; medians are compared.
//   ddp                     runs the configurations and compares them
//   ddp --worker ...        one configuration (started by the driver)
#include <torch/torch.h>

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iomanip>
#include <iostream>
#include <regex>
#include <sstream>
#include <thread>

#include <boost/program_options.hpp>

#include "benchmarks/common/median.h"
#include "cli.h"
#include "benchmarks/common/run_command.h"

#include "fabric/fabric.h"
#include "launchers/mpirun.h"
#include "model.h"
#include "strategies/ddp.h"

namespace {

int worker(int devices, int64_t batch, int steps, int cores, bool no_sync,
           const fabric::strategies::DDPOptions& ddp_options, bool retain_cpu_memory) {
  fabric::Fabric fabric({.accelerator = "cpu", .devices = devices, .ddp = ddp_options,
                         .retain_cpu_memory = retain_cpu_memory});
  fabric.launch();
  torch::set_num_threads(std::max(1, cores / static_cast<int>(fabric.world_size())));
  torch::manual_seed(0);
  auto model = std::make_shared<ClassifierImpl>();
  auto [net, opt] = fabric.setup(model, std::make_shared<torch::optim::Adam>(model->parameters(), 1e-3));
  auto gen = at::make_generator<at::CPUGeneratorImpl>(fabric.global_rank());
  auto x = torch::rand({batch, 1, 28, 28}, gen);
  auto y = torch::randint(0, 10, {batch}, gen, torch::kLong);
  auto step = [&, &net = net, &opt = opt] {
    opt.zero_grad();
    auto skip = fabric.no_backward_sync(net, no_sync);  // --no-sync: the ceiling without all-reduce
    fabric.backward(torch::cross_entropy_loss(net(x), y));
    opt.step();
  };
  for (int i = 0; i < 20; ++i) step();
  auto* ddp = dynamic_cast<fabric::strategies::DDPStrategy*>(&fabric.strategy());
  if (ddp) ddp->reset_stats();
  fabric.barrier();
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < steps; ++i) step();
  fabric.barrier();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const double throughput = static_cast<double>(fabric.world_size() * batch * steps) / seconds;
  double hidden = 0, comm_ms = 0;
  if (ddp && ddp->stats().comm_seconds > 0) {
    hidden = fabric.all_reduce(ddp->stats().hidden_seconds / ddp->stats().comm_seconds);
    comm_ms = fabric.all_reduce(ddp->stats().comm_seconds * 1e3 / steps);
  }
  fabric.print(std::fixed, std::setprecision(3), "ranks ", fabric.world_size(), ", threads/rank ",
               torch::get_num_threads(), ", per-rank batch ", batch, ", throughput: ", throughput,
               " samples/s, all-reduce hidden behind backward: ", hidden, " (all-reduce ",
               comm_ms, " ms a step)");
  return 0;
}

// The DDP flags the driver passes on to every worker.
std::string ddp_flags;

double run_worker(const std::string& self, int devices, int64_t batch, int steps, int cores,
                  double& hidden, bool no_sync = false) {
  const std::string cmd = self + " --worker" + ddp_flags + (no_sync ? " --no-sync" : "") + " --devices " + std::to_string(devices) +
                          " --batch-size " + std::to_string(batch) + " --steps " +
                          std::to_string(steps) + " --cores " + std::to_string(cores);
  const auto [status, output] = benchmarks::run_command(cmd);
  std::cout << output;
  std::smatch m;
  if (status != 0 || !std::regex_search(output, m, std::regex("throughput: ([0-9.]+) samples/s, "
                                                              "all-reduce hidden behind backward: ([0-9.]+)"))) {
    throw std::runtime_error("benchmark worker failed: " + cmd);
  }
  hidden = std::stod(m[2]);
  return std::stod(m[1]);
}

}  // namespace

int main(int argc, char** argv) {
  namespace po = boost::program_options;
  int devices = 1, steps = 200, rounds = 5, cores = static_cast<int>(std::thread::hardware_concurrency());
  int64_t batch = 64;
  po::options_description flags("DDP 2-rank vs 1-rank throughput on the CPU");
  bool no_sync = false;
  fabric::strategies::DDPOptions ddp;
  bool malloc_defaults = false;
  flags.add_options()("help,h", "show this help")("worker", "run one configuration")
      ("no-sync", po::bool_switch(&no_sync), "worker: skip the gradient all-reduce (no_backward_sync)")
      ("devices", po::value(&devices)->default_value(devices), "ranks (worker)")
      ("batch-size", po::value(&batch)->default_value(batch), "per-rank batch")
      ("steps", po::value(&steps)->default_value(steps), "timed steps")
      ("rounds", po::value(&rounds)->default_value(rounds), "runs of each configuration (medians)")
      ("cores", po::value(&cores)->default_value(cores), "cores shared by the ranks")
      ("bucket-cap-mb", po::value(&ddp.bucket_cap_mb)->default_value(ddp.bucket_cap_mb), "DDP bucket size")
      ("first-bucket-cap-mb", po::value(&ddp.first_bucket_cap_mb)->default_value(ddp.first_bucket_cap_mb),
       "DDP first bucket size")
      ("bucket-view", po::bool_switch(&ddp.gradient_as_bucket_view), "DDP gradient_as_bucket_view")
      ("malloc-defaults", po::bool_switch(&malloc_defaults), "FabricOptions::retain_cpu_memory = false");
  po::variables_map vm;
  examples::parse_flags(flags, argc, argv, vm);
  try {
    if (vm.count("worker")) return worker(devices, batch, steps, cores, no_sync, ddp, !malloc_defaults);
    {
      std::ostringstream passed;
      passed << " --bucket-cap-mb " << ddp.bucket_cap_mb << " --first-bucket-cap-mb " << ddp.first_bucket_cap_mb
             << (ddp.gradient_as_bucket_view ? " --bucket-view" : "")
             << (malloc_defaults ? " --malloc-defaults" : "");
      ddp_flags = passed.str();
    }
    const std::string self = fabric::launchers::own_command_line().front();
    if (rounds < 1 || steps < 1 || batch < 1 || cores < 1) {
      std::cerr << "error: --rounds, --steps, --batch-size and --cores must be at least 1" << std::endl;
      return 2;
    }
    // 1 rank x 1 thread, 1 rank x all cores, 2 ranks x (cores / 2) threads.
    // And 2 ranks x 1 thread without the all-reduce: what the machine allows two
    // processes side by side (shared caches and memory bandwidth), the ceiling.
    std::vector<double> one_thread, one_rank, two_ranks, two_unsynced, hidden;
    for (int r = 0; r < rounds; ++r) {
      double unused = 0, h = 0;
      one_thread.push_back(run_worker(self, 1, batch, steps, 1, unused));
      two_ranks.push_back(run_worker(self, 2, batch, steps, 2, h));
      two_unsynced.push_back(run_worker(self, 2, batch, steps, 2, unused, /*no_sync=*/true));
      hidden.push_back(h);
      one_rank.push_back(run_worker(self, 1, batch, steps, cores, unused));
    }
    const double two = benchmarks::median(two_ranks);
    std::cout << std::fixed << std::setprecision(3)
              << "share of all-reduce time hidden behind backward (2 ranks): " << benchmarks::median(hidden) << "\n"
              << "2 ranks without all-reduce (ceiling) 2x1-thread/1x1-thread: "
              << benchmarks::median(two_unsynced) / benchmarks::median(one_thread) << "\n"
              << "ddp scaling 2x1-thread/1x1-thread: " << two / benchmarks::median(one_thread)
              << " (per-rank batch " << batch << ")\n"
              << "ddp 2-rank/1-rank throughput: " << two / benchmarks::median(one_rank) << std::endl;
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << std::endl;
    return 1;
  }
}
