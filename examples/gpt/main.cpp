// A character-level GPT trained with AdamW on real English text: the fortune
// cookies of Debian's `fortunes` package (/usr/share/games/fortunes, installed by
// scripts/setup.sh), bytes as tokens, the last 10% held out for validation.
// Each transformer block is a sharding unit under --strategy fsdp, the model
// this strategy exists for; the same program runs single-device, DDP and under
// mpirun:
//   gpt --max-steps 200
//   gpt --devices 2 --strategy fsdp --n-layer 6 --n-embd 192
//   gpt --devices 2 --strategy ddp --precision bf16-mixed --sample 400
//   mpirun -np 2 gpt --strategy fsdp
//   gpt --devices 4 --strategy model_parallel --tensor-parallel-size 2   (2 x 2 mesh)
// Prints `step N: train_loss X val_loss Y` every --eval-every steps, then a text
// sample (every rank samples, since under fsdp each forward is collective; rank
// 0 prints).
#include <torch/torch.h>

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <exception>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <iterator>
#include <sstream>

#include "cli.h"
#include "fabric/fabric.h"
#include "data.h"
#include "model.h"


int run(int argc, char** argv) {
  examples::TrainArgs defaults;
  defaults.epochs = 3;
  defaults.run_name = "gpt";
  defaults.batch_size = 32;
  defaults.lr = 2e-3;
  GptConfig config;
  int64_t eval_every = 100, eval_batches = 8, sample = 200;
  bool untied = false;
  std::string data_dir = "/usr/share/games/fortunes";
  auto args = examples::parse_args(
      argc, argv,
      "Character-level GPT on Debian's fortunes, trained with torchfabric (an epoch is "
      "--eval-every steps)",
      defaults,
      {{"n-layer", "transformer blocks (each a sharding unit under fsdp)", &config.n_layer},
       {"n-head", "attention heads (must divide --n-embd)", &config.n_head},
       {"n-embd", "embedding width", &config.n_embd},
       {"block-size", "context length in characters", &config.block_size, 2},
       {"eval-every", "steps between evaluations (one epoch)", &eval_every},
       {"eval-batches", "validation batches per evaluation", &eval_batches},
       {"sample", "characters of text to sample at the end (0: none)", &sample, 0},
       {"untied-head", "give the output head its own weight (default: tied to the token embedding)",
        nullptr, 1, &untied},
       {"data", "directory of fortune files", nullptr, 1, nullptr, &data_dir}});
  config.tied_head = !untied;
  if (config.n_embd % config.n_head != 0) {
    std::cerr << "error: --n-embd (" << config.n_embd << ") must be a multiple of --n-head ("
              << config.n_head << ")" << std::endl;
    return 2;
  }

  fabric::Fabric fabric(args.fabric);
  fabric.launch();
  fabric.seed_everything(args.seed);

  auto text = load_fortunes(data_dir);
  const int64_t split = text.size(0) * 9 / 10;
  auto train_data = text.slice(0, 0, split), val_data = text.slice(0, split);

  // Under model_parallel the layers split over the tensor-parallel group (a
  // group of one, every layer whole, under every other strategy).
  const auto tp = fabric::tp::tensor_parallel_group(fabric.strategy());
  auto model = fabric.init_module<GptImpl>(config, tp);
  const int64_t local_params = model->num_parameters();
  int64_t split_params = 0;
  for (const auto& m : model->modules()) {
    if (const auto* layer = dynamic_cast<const fabric::tp::ParallelLayer*>(m.get())) {
      for (const auto& [p, how] : layer->split_parameters()) split_params += p.numel();
    }
  }
  const int64_t n_params = local_params + (tp.size - 1) * split_params;  // the unsplit model's
  auto optimizer = std::make_shared<torch::optim::AdamW>(
      model->parameters(), torch::optim::AdamWOptions(args.lr).weight_decay(0.01));
  auto [net, opt] = fabric.setup(model, optimizer);

  int64_t step = 0;
  if (const auto resume = examples::resume_path(fabric, args); !resume.empty()) {
    fabric::State state{{"model", net}, {"optimizer", opt}, {"step", 0}};
    fabric.load(resume, state);
    step = state.at("step").to_int();
    fabric.print("resumed from ", resume, " at step ", step);
  }
  const int64_t total = args.max_steps >= 0 ? args.max_steps : args.epochs * eval_every;
  fabric.print("gpt: ", n_params, " parameters, ", config.n_layer, " blocks, ", text.size(0),
               " characters; ", fabric.world_size(), " rank(s), strategy ", fabric.strategy().name(),
               ", precision ", fabric.precision().name(), ", ", total, " steps");
  if (tp.size > 1) {
    fabric.print("tensor parallel: ", tp.size, " x data parallel: ", fabric.strategy().data_parallel_size(),
                 "; parameters on each rank: ", local_params);
  }

  // Each data-parallel rank draws its own batches (tensor-parallel peers the
  // same ones); the stream depends on the seed, that rank and the step only.
  const int64_t data_rank = fabric.strategy().data_parallel_rank();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(args.seed * 1000 + data_rank);
  auto evaluate = [&](const torch::Tensor& data) {
    torch::NoGradGuard no_grad;
    net->eval();
    auto eval_gen = at::make_generator<at::CPUGeneratorImpl>(7 + data_rank);
    double sum = 0;
    for (int64_t i = 0; i < eval_batches; ++i) {
      auto [x, y] = get_batch(data, args.batch_size, config.block_size, eval_gen);
      sum += model->loss(net(fabric.to_device(x)), fabric.to_device(y)).item<double>();
    }
    net->train();
    return fabric.all_reduce(sum / eval_batches, "mean");
  };

  fabric.log_hyperparams({{"lr", args.lr}, {"batch_size", args.batch_size},
                          {"n_layer", config.n_layer}, {"block_size", config.block_size},
                          {"parameters", n_params}, {"precision", fabric.precision().name()},
                          {"strategy", fabric.strategy().name()}});
  fabric::ProgressBar bar({.mode = args.progress, .total = total}, fabric.is_global_zero());
  net->train();
  double running = 0;
  int64_t counted = 0;
  for (; step < total;) {
    auto [x, y] = get_batch(train_data, args.batch_size, config.block_size, gen);
    opt.zero_grad();
    auto loss = model->loss(net(fabric.to_device(x)), fabric.to_device(y));
    fabric.backward(loss);
    fabric.clip_gradients(net, opt, {.max_norm = 1.0});
    opt.step();
    ++step;
    const double value = loss.item<double>();
    running += value;
    ++counted;
    if (step % args.log_every == 0) fabric.log("train_loss", value, step);
    bar.update(step, {{"loss", value}});
    if (step % eval_every == 0 || step == total) {
      bar.close();
      const double train_loss = fabric.all_reduce(running / counted, "mean");
      const double val_loss = evaluate(val_data);
      fabric.log("val_loss", val_loss, step);
      fabric.print("step ", step, ": train_loss ", std::fixed, std::setprecision(4), train_loss,
                   " val_loss ", val_loss);
      running = 0;
      counted = 0;
    }
  }
  if (!args.checkpoint.empty()) {
    fabric.save(args.checkpoint, {{"model", net}, {"optimizer", opt}, {"step", step}});
  }

  if (sample > 0) {
    torch::NoGradGuard no_grad;
    net->eval();
    auto sample_gen = at::make_generator<at::CPUGeneratorImpl>(args.seed);
    std::string prompt = "The ";
    std::vector<int64_t> tokens(prompt.begin(), prompt.end());
    for (int64_t i = 0; i < sample; ++i) {
      const int64_t start = std::max<int64_t>(0, static_cast<int64_t>(tokens.size()) - config.block_size);
      auto context = torch::tensor(std::vector<int64_t>(tokens.begin() + start, tokens.end())).unsqueeze(0);
      auto logits = model->full_logits(net(fabric.to_device(context))).select(1, -1).to(torch::kFloat).cpu();
      auto probs = torch::softmax(logits / 0.8, -1);
      tokens.push_back(torch::multinomial(probs, 1, false, sample_gen).item<int64_t>());
    }
    std::string out(tokens.begin(), tokens.end());
    fabric.print("sample:\n", out);
  }
  return 0;
}

int main(int argc, char** argv) { return examples::run_main(run, argc, argv); }
