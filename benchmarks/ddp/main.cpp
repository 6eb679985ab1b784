// DDP scaling on the CPU: training throughput of the classifier MLP with 2 ranks
// against 1 rank, the same per-rank batch, the cores split evenly between ranks;
// and how much of the gradient all-reduce time ran while backward was still
// computing (the overlap DDP's bucketing is for).
//   ddp                     runs both configurations and compares them
//   ddp --worker ...        one configuration (started by the driver)
// Last line: `ddp 2-rank/1-rank throughput: X`.
#include <torch/torch.h>

#include <ATen/CPUGeneratorImpl.h>

#include <chrono>
#include <cstdio>
#include <iomanip>
#include <iostream>
#include <regex>
#include <thread>

#include <boost/program_options.hpp>

#include "cli.h"
#include "benchmarks/common/run_command.h"

#include "fabric/fabric.h"
#include "launchers/mpirun.h"
#include "model.h"
#include "strategies/ddp.h"

namespace {

int worker(int devices, int64_t batch, int steps, int cores) {
  fabric::Fabric fabric({.accelerator = "cpu", .devices = devices});
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
  double hidden = 0;
  if (ddp && ddp->stats().comm_seconds > 0) {
    hidden = fabric.all_reduce(ddp->stats().hidden_seconds / ddp->stats().comm_seconds);
  }
  fabric.print(std::fixed, std::setprecision(3), "ranks ", fabric.world_size(), ", threads/rank ",
               torch::get_num_threads(), ", per-rank batch ", batch, ", throughput: ", throughput,
               " samples/s, all-reduce hidden behind backward: ", hidden);
  return 0;
}

double run_worker(const std::string& self, int devices, int64_t batch, int steps, int cores,
                  double& hidden) {
  const std::string cmd = self + " --worker --devices " + std::to_string(devices) +
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
  int devices = 1, steps = 200, cores = static_cast<int>(std::thread::hardware_concurrency());
  int64_t batch = 64;
  po::options_description flags("DDP 2-rank vs 1-rank throughput on the CPU");
  flags.add_options()("help,h", "show this help")("worker", "run one configuration")
      ("devices", po::value(&devices)->default_value(devices), "ranks (worker)")
      ("batch-size", po::value(&batch)->default_value(batch), "per-rank batch")
      ("steps", po::value(&steps)->default_value(steps), "timed steps")
      ("cores", po::value(&cores)->default_value(cores), "cores shared by the ranks");
  po::variables_map vm;
  examples::parse_flags(flags, argc, argv, vm);
  try {
    if (vm.count("worker")) return worker(devices, batch, steps, cores);
    const std::string self = fabric::launchers::own_command_line().front();
    double hidden1 = 0, hidden2 = 0;
    const double one = run_worker(self, 1, batch, steps, cores, hidden1);
    const double two = run_worker(self, 2, batch, steps, cores, hidden2);
    std::cout << std::fixed << std::setprecision(3)
              << "share of all-reduce time hidden behind backward (2 ranks): " << hidden2 << "\n"
              << "ddp 2-rank/1-rank throughput: " << two / one << std::endl;
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << std::endl;
    return 1;
  }
}
