// The seed example: an autoencoder on Fashion-MNIST (784 -> 128 -> 3 -> 128 -> 784),
// trained with Adam on 55000 images and validated on the other 5000, through Fabric.
// Runs unchanged on CPU or GPU, in any precision, on several processes; writes a
// checkpoint Python can open (torch.load) and continues from one with --resume:
//   autoencoder --max-steps 50
//   autoencoder --accelerator cuda --precision bf16-mixed --epochs 2
//   autoencoder --devices 2 --strategy ddp          (2 CPU ranks, started by Fabric)
//   autoencoder --max-steps 20 --checkpoint a.pt && autoencoder --max-steps 40 --resume a.pt
#include <torch/torch.h>
#include <ATen/CPUGeneratorImpl.h>

#include <exception>
#include <iomanip>

#include "cli.h"
#include "data/fashion_mnist.h"
#include "fabric/fabric.h"

struct AutoEncoderImpl : torch::nn::Module {
  AutoEncoderImpl()
      : encoder(register_module("encoder", torch::nn::Sequential(torch::nn::Linear(28 * 28, 128),
                                                                  torch::nn::ReLU(),
                                                                  torch::nn::Linear(128, 3)))),
        decoder(register_module("decoder", torch::nn::Sequential(torch::nn::Linear(3, 128),
                                                                  torch::nn::ReLU(),
                                                                  torch::nn::Linear(128, 28 * 28)))) {}

  torch::Tensor forward(torch::Tensor x) { return decoder->forward(encoder->forward(x)); }

  torch::nn::Sequential encoder, decoder;
};

int run(int argc, char** argv) {
  examples::TrainArgs defaults;
  defaults.epochs = 5;
  defaults.checkpoint = "autoencoder.pt";
  defaults.run_name = "autoencoder";
  auto args = examples::parse_args(argc, argv, "Fashion-MNIST autoencoder trained with torchfabric",
                                   defaults);

  fabric::Fabric fabric(args.fabric);
  fabric.launch();
  fabric.seed_everything(args.seed);

  // 55000 / 5000 split of the 60000 training images, fixed by the seed.
  auto full = fabric::data::load_fashion_mnist(fabric::data::Split::kTrain);
  auto generator = at::make_generator<at::CPUGeneratorImpl>(args.seed);
  auto order = torch::randperm(60000, generator, torch::kLong);
  auto train_set = full.select(order.slice(0, 0, 55000));
  auto val_set = full.select(order.slice(0, 55000));

  auto model = fabric.init_module<AutoEncoderImpl>();
  // Adam's default eps (1e-8) rounds to 0 in fp16, and sqrt(v) + eps = 0 then gives
  // NaN; an all-fp16 model ("16-true") needs an eps fp16 can hold.
  const double eps = fabric.precision().name() == "16-true" ? 1e-4 : 1e-8;
  auto optimizer = std::make_shared<torch::optim::Adam>(model->parameters(),
                                                        torch::optim::AdamOptions(args.lr).eps(eps));
  auto [net, opt] = fabric.setup(model, optimizer);
  auto train_loader = fabric.setup_dataloader(
      train_set, {.batch_size = args.batch_size, .shuffle = true});
  auto val_loader = fabric.setup_dataloader(val_set, {.batch_size = 256});

  // Resume: model, optimizer, RNG state and the position in the data.
  int64_t step = 0, start_epoch = 0, skip_batches = 0;
  if (const auto resume = examples::resume_path(fabric, args); !resume.empty()) {
    fabric::State state{{"model", net}, {"optimizer", opt}, {"step", 0}, {"epoch", 0},
                        {"batch", 0}, {"rng", fabric::RngState()}};
    fabric.load(resume, state);
    step = state.at("step").to_int();
    start_epoch = state.at("epoch").to_int();
    skip_batches = state.at("batch").to_int();
    fabric.print("resumed from ", resume, " at step ", step);
  }

  fabric.print("training on ", fabric.device(), " with precision ", fabric.precision().name(),
               ", ", train_loader.size(), " steps per epoch");
  fabric.log_hyperparams({{"lr", args.lr}, {"batch_size", args.batch_size},
                          {"epochs", int64_t{args.epochs}}, {"max_steps", args.max_steps},
                          {"precision", fabric.precision().name()},
                          {"strategy", fabric.strategy().name()}, {"world_size", int64_t{fabric.world_size()}},
                          {"seed", static_cast<int64_t>(args.seed)}});
  const int64_t steps_per_epoch = static_cast<int64_t>(train_loader.size());
  int64_t last_step = args.epochs * steps_per_epoch;
  if (args.max_steps >= 0) last_step = std::min(last_step, args.max_steps);
  fabric::ProgressBar bar({.mode = args.progress, .total = last_step}, fabric.is_global_zero());
  int64_t epoch = start_epoch, batch_in_epoch = skip_batches;
  for (; epoch < args.epochs; ++epoch) {
    if (args.max_steps >= 0 && step >= args.max_steps) break;
    net->train();
    train_loader.set_epoch(epoch);
    double train_sum = 0;
    int64_t train_batches = 0;
    batch_in_epoch = 0;
    for (auto& batch : train_loader) {
      if (batch_in_epoch < skip_batches) {  // already trained on before the resume
        ++batch_in_epoch;
        continue;
      }
      if (args.max_steps >= 0 && step >= args.max_steps) break;
      auto x = batch.data.flatten(1);
      opt.zero_grad();
      auto out = net(x);
      auto loss = torch::mse_loss(out, x.to(out.scalar_type()));
      fabric.backward(loss);
      opt.step();
      ++step;
      ++batch_in_epoch;
      const double value = loss.item<double>();
      train_sum += value;
      ++train_batches;
      if (step % args.log_every == 0) fabric.log("train_loss", value, step);
      bar.update(step, {{"loss", value}}, "epoch " + std::to_string(epoch));
    }
    bar.close();
    skip_batches = 0;
    net->eval();
    torch::NoGradGuard no_grad;
    double val_sum = 0;
    int64_t val_count = 0;
    for (auto& batch : val_loader) {
      auto x = batch.data.flatten(1);
      auto out = net(x);
      val_sum += torch::mse_loss(out, x.to(out.scalar_type()), torch::Reduction::Sum).item<double>();
      val_count += x.numel();
    }
    // Every rank saw its own shard: combine before printing.
    const double train_loss = fabric.all_reduce(train_sum / std::max<int64_t>(train_batches, 1));
    const double val_total = fabric.all_reduce(val_sum, "sum");
    const double val_elements = fabric.all_reduce(static_cast<double>(val_count), "sum");
    fabric.log_dict({{"val_loss", val_total / std::max(val_elements, 1.0)}, {"epoch", static_cast<double>(epoch)}},
                    step);
    fabric.print("epoch ", epoch, ": train_loss ", std::fixed, std::setprecision(5), train_loss,
                 " val_loss ", val_total / std::max(val_elements, 1.0));
    if (args.max_steps >= 0 && step >= args.max_steps) break;
  }
  if (!args.checkpoint.empty()) {
    // A finished epoch resumes at the start of the next one.
    const bool all_done = epoch >= args.epochs;  // the loop ran out of epochs
    const bool epoch_done =
        all_done || batch_in_epoch >= static_cast<int64_t>(train_loader.size());
    const int64_t next_epoch = all_done ? epoch : (epoch_done ? epoch + 1 : epoch);
    fabric.save(args.checkpoint, {{"model", net}, {"optimizer", opt}, {"step", step},
                                  {"epoch", next_epoch}, {"batch", epoch_done ? 0 : batch_in_epoch},
                                  {"rng", fabric::RngState::capture()}});
    fabric.print("saved checkpoint to ", args.checkpoint, " at step ", step);
  }
  return 0;
}

int main(int argc, char** argv) { return examples::run_main(run, argc, argv); }
