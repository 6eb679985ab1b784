// An MLP classifier on Fashion-MNIST through Fabric: trains on the 60000 training
// images and reports accuracy on the 10000 test images as its last line,
// `test accuracy: X` (about 0.88-0.89 after the default 8 epochs).
#include <torch/torch.h>

#include <exception>
#include <iomanip>

#include "cli.h"
#include "data/fashion_mnist.h"
#include "fabric/fabric.h"
#include "model.h"

int run(int argc, char** argv) {
  examples::TrainArgs defaults;
  defaults.epochs = 8;
  defaults.batch_size = 128;
  defaults.run_name = "classifier";
  auto args = examples::parse_args(argc, argv, "Fashion-MNIST MLP classifier trained with torchfabric",
                                   defaults);

  fabric::Fabric fabric(args.fabric);
  fabric.launch();
  fabric.seed_everything(args.seed);

  auto train_set = fabric::data::load_fashion_mnist(fabric::data::Split::kTrain);
  auto test_set = fabric::data::load_fashion_mnist(fabric::data::Split::kTest);
  auto model = fabric.init_module<ClassifierImpl>();
  auto optimizer = std::make_shared<torch::optim::Adam>(model->parameters(),
                                                        torch::optim::AdamOptions(args.lr));
  auto [net, opt] = fabric.setup(model, optimizer);
  auto train_loader =
      fabric.setup_dataloader(train_set, {.batch_size = args.batch_size, .shuffle = true});
  auto test_loader = fabric.setup_dataloader(test_set, {.batch_size = 1000});

  fabric.log_hyperparams({{"lr", args.lr}, {"batch_size", args.batch_size},
                          {"epochs", int64_t{args.epochs}}, {"precision", fabric.precision().name()},
                          {"strategy", fabric.strategy().name()}});
  int64_t last_step = args.epochs * static_cast<int64_t>(train_loader.size());
  if (args.max_steps >= 0) last_step = std::min(last_step, args.max_steps);
  fabric::ProgressBar bar({.mode = args.progress, .total = last_step}, fabric.is_global_zero());
  int64_t step = 0;
  for (int epoch = 0; epoch < args.epochs; ++epoch) {
    if (args.max_steps >= 0 && step >= args.max_steps) break;
    net->train();
    double loss_sum = 0;
    int64_t batches = 0;
    for (auto& batch : train_loader) {
      if (args.max_steps >= 0 && step >= args.max_steps) break;
      opt.zero_grad();
      auto loss = torch::cross_entropy_loss(net(batch.data), batch.target);
      fabric.backward(loss);
      opt.step();
      ++step;
      const double value = loss.item<double>();
      loss_sum += value;
      ++batches;
      if (step % args.log_every == 0) fabric.log("train_loss", value, step);
      bar.update(step, {{"loss", value}}, "epoch " + std::to_string(epoch));
    }
    bar.close();
    // Validation loss per epoch, on the test images (the example has no separate
    // validation split), over every rank's shard.
    net->eval();
    double val_sum = 0, val_count = 0;
    {
      torch::NoGradGuard no_grad;
      for (auto& batch : test_loader) {
        val_sum += torch::cross_entropy_loss(net(batch.data), batch.target, {}, torch::Reduction::Sum)
                       .item<double>();
        val_count += static_cast<double>(batch.target.size(0));
      }
    }
    const double val_loss = fabric.all_reduce(val_sum, "sum") / std::max(1.0, fabric.all_reduce(val_count, "sum"));
    fabric.log("val_loss", val_loss, step);
    fabric.print("epoch ", epoch, ": train_loss ", std::fixed, std::setprecision(4),
                 loss_sum / std::max<int64_t>(batches, 1), " val_loss ", val_loss);
  }

  net->eval();
  torch::NoGradGuard no_grad;
  int64_t correct = 0, total = 0;
  for (auto& batch : test_loader) {
    auto predicted = net(batch.data).argmax(1);
    correct += predicted.eq(batch.target).sum().item<int64_t>();
    total += batch.target.size(0);
  }
  if (!args.checkpoint.empty()) fabric.save(args.checkpoint, {{"model", net}, {"optimizer", opt}});
  // Each rank evaluated its shard (padded to equal length across ranks).
  const double all_correct = fabric.all_reduce(static_cast<double>(correct), "sum");
  const double all_total = fabric.all_reduce(static_cast<double>(total), "sum");
  fabric.log("test_accuracy", all_correct / all_total, step);
  fabric.print("test accuracy: ", std::fixed, std::setprecision(4), all_correct / all_total);
  return 0;
}

int main(int argc, char** argv) { return examples::run_main(run, argc, argv); }
