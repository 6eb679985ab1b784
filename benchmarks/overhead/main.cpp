// Overhead of Fabric on the training step: the classifier's step (forward,
// cross-entropy, backward, Adam) through Fabric's wrappers against the same step in
// raw LibTorch, on the same pre-loaded batches, threads and seed. The two loops are
// interleaved step by step (alternating which goes first) so machine noise hits both
// alike. Last line: `fabric/raw step time: X` (ratio of the median step times).
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <iomanip>
#include <iostream>

#include <boost/program_options.hpp>

#include "benchmarks/common/median.h"
#include "cli.h"

#include "data/fashion_mnist.h"
#include "fabric/fabric.h"
#include "model.h"

namespace {

using Clock = std::chrono::steady_clock;

}  // namespace

int main(int argc, char** argv) {
  namespace po = boost::program_options;
  int rounds = 10, steps = 50, threads = 2;
  int64_t batch_size = 128;
  std::string precision = "32-true";
  po::options_description flags("fabric vs raw LibTorch step time");
  flags.add_options()("help,h", "show this help")
      ("rounds", po::value(&rounds)->default_value(rounds), "interleaved rounds")
      ("steps", po::value(&steps)->default_value(steps), "steps per loop per round")
      ("batch-size", po::value(&batch_size)->default_value(batch_size), "batch size")
      ("threads", po::value(&threads)->default_value(threads), "intra-op threads")
      ("precision", po::value(&precision)->default_value(precision), "Fabric precision (cpu)");
  po::variables_map vm;
  examples::parse_flags(flags, argc, argv, vm);
  torch::set_num_threads(threads);

  auto data = fabric::data::load_fashion_mnist(fabric::data::Split::kTrain);
  std::vector<torch::data::Example<>> batches;
  for (int i = 0; i < steps; ++i) {
    batches.push_back({data.data().slice(0, i * batch_size, (i + 1) * batch_size).contiguous(),
                       data.target().slice(0, i * batch_size, (i + 1) * batch_size).contiguous()});
  }

  fabric::Fabric fabric({.accelerator = "cpu", .precision = precision});
  fabric.launch();
  torch::manual_seed(0);
  auto fabric_model = std::make_shared<ClassifierImpl>();
  auto fabric_adam = std::make_shared<torch::optim::Adam>(fabric_model->parameters(), 1e-3);
  auto [net, opt] = fabric.setup(fabric_model, fabric_adam);
  torch::manual_seed(0);
  auto raw_model = std::make_shared<ClassifierImpl>();
  torch::optim::Adam raw_adam(raw_model->parameters(), 1e-3);

  auto fabric_step = [&, &net = net, &opt = opt](const torch::data::Example<>& b) {
    opt.zero_grad();
    auto loss = torch::cross_entropy_loss(net(b.data), b.target);
    fabric.backward(loss);
    opt.step();
  };
  auto raw_step = [&](const torch::data::Example<>& b) {
    raw_adam.zero_grad();
    auto loss = torch::cross_entropy_loss(raw_model->forward(b.data), b.target);
    loss.backward();
    raw_adam.step();
  };
  auto time_it = [](auto&& step, const torch::data::Example<>& b) {
    auto start = Clock::now();
    step(b);
    return std::chrono::duration<double>(Clock::now() - start).count();
  };

  // Warm-up: allocator, Adam state, thread pool.
  for (auto& b : batches) {
    fabric_step(b);
    raw_step(b);
  }
  // Steps alternate between the two loops (and which goes first), so a noisy
  // neighbour or frequency change hits both alike; medians drop preempted steps.
  std::vector<double> fabric_times, raw_times;
  for (int r = 0; r < rounds; ++r) {
    for (size_t i = 0; i < batches.size(); ++i) {
      if ((r + i) % 2 == 0) {
        fabric_times.push_back(time_it(fabric_step, batches[i]));
        raw_times.push_back(time_it(raw_step, batches[i]));
      } else {
        raw_times.push_back(time_it(raw_step, batches[i]));
        fabric_times.push_back(time_it(fabric_step, batches[i]));
      }
    }
  }
  const double fabric_ms = benchmarks::median(fabric_times) * 1e3, raw_ms = benchmarks::median(raw_times) * 1e3;
  std::cout << std::fixed << std::setprecision(3) << "precision " << precision << ", batch "
            << batch_size << ", threads " << threads << ", " << rounds << " rounds x " << steps
            << " steps, interleaved\n"
            << "raw step (median): " << raw_ms << " ms\n"
            << "fabric step (median): " << fabric_ms << " ms\n"
            << "fabric/raw step time: " << fabric_ms / raw_ms << std::endl;
  return 0;
}
