// A user's own training loop on an installed torchfabric: fits y = 3x - 1 with
// Fabric, saves a checkpoint, loads it into a fresh model and prints what the
// test compares (the loss before and after, and whether the loaded weights
// equal the trained ones).
#include <torch/torch.h>

#include <cstdio>

#include "fabric/fabric.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: downstream CHECKPOINT\n");
    return 2;
  }
  fabric::Fabric fabric({.accelerator = "cpu"});
  fabric.launch();
  fabric.seed_everything(7);
  auto model = torch::nn::Linear(1, 1);
  auto optimizer = std::make_shared<torch::optim::SGD>(model->parameters(), 0.1);
  auto [net, opt] = fabric.setup(model, optimizer);
  const auto x = torch::linspace(-1, 1, 32).unsqueeze(1);
  const auto y = 3 * x - 1;
  double first = 0, last = 0;
  for (int step = 0; step < 200; ++step) {
    opt.zero_grad();
    auto loss = torch::mse_loss(net(x), y);
    fabric.backward(loss);
    opt.step();
    (step == 0 ? first : last) = loss.item<double>();
  }
  fabric.save(argv[1], {{"model", net}, {"optimizer", opt}, {"step", 200}});
  auto copy = torch::nn::Linear(1, 1);
  fabric::State state{{"model", copy.ptr()}, {"step", 0}};
  fabric.load(argv[1], state);
  const bool same = torch::equal(copy->weight, model->weight) && torch::equal(copy->bias, model->bias);
  std::printf("downstream: loss %.6f -> %.6f, weight %.4f, bias %.4f, step %lld, loaded %s\n",
              first, last, model->weight.item<double>(),
              model->bias.item<double>(), static_cast<long long>(state.at("step").to_int()),
              same ? "equal" : "DIFFERENT");
  return same ? 0 : 1;
}
