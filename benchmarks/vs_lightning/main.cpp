// torchfabric against Python Lightning Fabric 2.6, side by side: the same model,
// random data (a TensorDataset of 2048 examples behind a shuffled loader), SGD,
// batch size, fp32 and 1 thread, each side in its own process: the classifier
// MLP at batch 64 and 4, Lightning's parity ConvNet at batch 4, the GPT example
// (defaults, tied head) at batch 8 on random byte windows
// (vs_lightning.py here is the Python side), alternated round by round and the
// medians compared. Per model, then the smallest ratio:
//   torchfabric/lightning steps/s: X (mlp, batch 64)
//   torchfabric/lightning steps/s (smallest): X
//   vs_lightning [--rounds 3] [--python python3] [--script benchmarks/vs_lightning/vs_lightning.py]
//   vs_lightning --worker --model mlp|convnet --batch-size B --steps N   (the C++ side)
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iomanip>
#include <iostream>
#include <type_traits>

#include <boost/program_options.hpp>

#include "benchmarks/common/median.h"
#include "benchmarks/common/run_command.h"
#include "cli.h"
#include "data/tensor_dataset.h"
#include "fabric/fabric.h"
#include "launchers/mpirun.h"
#include "examples/classifier/model.h"
#include "examples/gpt/model.h"

namespace {

// Lightning's small-model parity ConvNet (3x32x32 inputs).
struct ConvNetImpl : torch::nn::Module {
  ConvNetImpl()
      : layers(register_module(
            "layers",
            torch::nn::Sequential(torch::nn::Conv2d(3, 6, 5), torch::nn::ReLU(),
                                  torch::nn::MaxPool2d(torch::nn::MaxPool2dOptions(2).stride(2)),
                                  torch::nn::Conv2d(6, 16, 5), torch::nn::ReLU(),
                                  torch::nn::MaxPool2d(torch::nn::MaxPool2dOptions(2).stride(2)),
                                  torch::nn::Flatten(), torch::nn::Linear(16 * 5 * 5, 120), torch::nn::ReLU(),
                                  torch::nn::Linear(120, 84), torch::nn::ReLU(), torch::nn::Linear(84, 10)))) {}
  torch::Tensor forward(torch::Tensor x) { return layers->forward(x); }
  torch::nn::Sequential layers;
};

template <typename Model>
std::shared_ptr<Model> make() {
  if constexpr (std::is_same_v<Model, GptImpl>) {
    return std::make_shared<GptImpl>(GptConfig{});  // the example's defaults
  } else {
    return std::make_shared<Model>();
  }
}

template <typename Model>
double train(const std::string& name, int64_t batch_size, int steps) {
  fabric::Fabric fabric({.accelerator = "cpu", .devices = 1, .precision = "32-true"});
  fabric.launch();
  torch::manual_seed(0);
  auto data = name == "gpt"  // random byte windows and their next-byte targets
                  ? fabric::data::TensorDataset(torch::randint(0, 256, {2048, 64}),
                                                torch::randint(0, 256, {2048, 64}))
                  : fabric::data::TensorDataset(
                        torch::randn(name == "mlp" ? std::vector<int64_t>{2048, 784}
                                                   : std::vector<int64_t>{2048, 3, 32, 32}),
                        torch::randint(0, 10, {2048}));
  auto model = make<Model>();
  auto optimizer = std::make_shared<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(0.01));
  auto [net, opt] = fabric.setup(model, optimizer);
  auto loader = fabric.setup_dataloader(data, {.batch_size = batch_size, .shuffle = true});
  net->train();
  auto run = [&, &net = net, &opt = opt](int count) {
    int done = 0;
    while (done < count) {
      for (auto& batch : loader) {
        opt.zero_grad();
        auto out = net(batch.data);
        auto loss = torch::cross_entropy_loss(out.reshape({-1, out.size(-1)}), batch.target.reshape({-1}));
        fabric.backward(loss);
        opt.step();
        if (++done == count) return;
      }
    }
  };
  run(std::max(5, steps / 10));  // warm-up, as the Python side
  const auto start = std::chrono::steady_clock::now();
  run(steps);
  return steps / std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

double steps_per_second(const std::string& command) { return benchmarks::figure(command, "steps/s"); }

}  // namespace

int run(int argc, char** argv) {
  namespace po = boost::program_options;
  bool worker = false;
  std::string model = "mlp", python = "python3", script = "benchmarks/vs_lightning/vs_lightning.py";
  int64_t batch_size = 64;
  int steps = 300, rounds = 3;
  po::options_description flags("torchfabric vs Python Lightning Fabric, steps/s\n\nOptions");
  flags.add_options()("help,h", "show this help and exit")
      ("rounds", po::value(&rounds)->default_value(rounds), "alternated rounds per model (medians)")
      ("python", po::value(&python)->default_value(python), "python3 with torch and lightning")
      ("script", po::value(&script)->default_value(script), "the Python side")
      ("worker", po::bool_switch(&worker), "run one side (C++) and print steps/s")
      ("model", po::value(&model)->default_value(model), "with --worker: mlp, convnet or gpt")
      ("batch-size", po::value(&batch_size)->default_value(batch_size), "with --worker")
      ("steps", po::value(&steps)->default_value(steps), "with --worker: timed steps");
  po::variables_map vm;
  examples::parse_flags(flags, argc, argv, vm);
  if (rounds < 1 || steps < 1 || batch_size < 1) {
    std::cerr << "error: --rounds, --steps and --batch-size must be at least 1" << std::endl;
    return 2;
  }
  if (worker) {
    torch::set_num_threads(1);
    double rate;
    if (model == "mlp") {
      rate = train<ClassifierImpl>(model, batch_size, steps);
    } else if (model == "convnet") {
      rate = train<ConvNetImpl>(model, batch_size, steps);
    } else if (model == "gpt") {
      rate = train<GptImpl>(model, batch_size, steps);
    } else {
      std::cerr << "error: --model must be mlp, convnet or gpt, got '" << model << "'" << std::endl;
      return 2;
    }
    std::cout << "steps/s: " << std::fixed << std::setprecision(3) << rate << std::endl;
    return 0;
  }

  struct Case {
    std::string model;
    int64_t batch;
    int steps;
  };
  const std::vector<Case> cases{{"mlp", 64, 300}, {"mlp", 4, 1500}, {"convnet", 4, 1500}, {"gpt", 8, 60}};
  const std::string self = fabric::launchers::own_command_line().front();
  double smallest = 1e30;
  for (const auto& c : cases) {
    const std::string args = " --model " + c.model + " --batch-size " + std::to_string(c.batch) +
                             " --steps " + std::to_string(c.steps);
    std::vector<double> ours, theirs;
    for (int r = 0; r < rounds; ++r) {  // alternate which side goes first
      if (r % 2 == 0) ours.push_back(steps_per_second(self + " --worker" + args));
      theirs.push_back(steps_per_second(python + " " + script + args));
      if (r % 2 == 1) ours.push_back(steps_per_second(self + " --worker" + args));
    }
    const double ratio = benchmarks::median(ours) / benchmarks::median(theirs);
    smallest = std::min(smallest, ratio);
    std::cout << std::fixed << std::setprecision(1) << c.model << " batch " << c.batch << ": torchfabric "
              << benchmarks::median(ours) << " steps/s, lightning " << benchmarks::median(theirs) << " steps/s" << std::endl;
    std::cout << std::setprecision(3) << "torchfabric/lightning steps/s: " << ratio << " (" << c.model
              << ", batch " << c.batch << ")" << std::endl;
  }
  std::cout << "torchfabric/lightning steps/s (smallest): " << std::setprecision(3) << smallest << std::endl;
  return 0;
}

int main(int argc, char** argv) { return examples::run_main(run, argc, argv); }
