// The custom trainer (trainer.h) training the Fashion-MNIST classifier: a 55000 /
// 5000 train/validation split, AdamW with linear warm-up then cosine decay,
// gradient accumulation and clipping, validation and checkpoints every N steps,
// resuming from the newest checkpoint in --checkpoint-dir. Last line:
// `test accuracy: X`.
//   custom_trainer --max-steps 300 --accumulate 2 --checkpoint-dir ckpts
//   custom_trainer --devices 2 --strategy ddp --precision bf16-mixed
#include <torch/torch.h>

#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <csignal>
#include <iomanip>

#include "cli.h"
#include "data/fashion_mnist.h"
#include "fabric/fabric.h"
#include "launchers/restarts.h"
#include "model.h"
#include "trainer.h"

namespace {
// Raises SIGKILL at this step (a crash, for the resume and restart tests; 0:
// never), on rank `rank` (-1: every rank), in the first `attempts` attempts of
// a restarted job (FABRIC_RESTART_COUNT below it; 0: in every attempt). Fault
// injection belongs to the program, not to the library.
struct KillAt : fabric::Callback {
  KillAt(int64_t step, int64_t rank, int64_t attempts) : step(step), rank(rank), attempts(attempts) {}
  void on(const std::string& hook, fabric::Fabric& fabric) override {
    if (hook != "on_train_batch_end" || step <= 0 || trainer->global_step() != step) return;
    if (rank >= 0 && fabric.global_rank() != rank) return;
    if (attempts > 0 && fabric::launchers::restart_count() >= attempts) return;
    std::raise(SIGKILL);
  }
  const Trainer<ClassifierImpl>* trainer = nullptr;
  int64_t step, rank, attempts;
};
}  // namespace

int run(int argc, char** argv) {
  examples::TrainArgs defaults;
  defaults.epochs = 3;
  defaults.batch_size = 64;
  defaults.run_name = "custom_trainer";
  defaults.checkpoint = "";
  int64_t accumulate = 1, val_every = 0, checkpoint_every = 0, warmup = 100, kill_at_step = 0;
  int64_t kill_rank = -1, kill_attempts = 0;
  std::string checkpoint_dir, clip = "1.0";
  auto args = examples::parse_args(
      argc, argv, "Fashion-MNIST classifier trained by a custom trainer built on torchfabric", defaults,
      {{"accumulate", "batches per optimizer step (gradient accumulation)", &accumulate},
       {"clip", "clip the gradients' total norm to this (0: no clipping)", nullptr, 1, nullptr, &clip},
       {"val-every", "validate every N optimizer steps (0: at each epoch's end only)", &val_every, 0},
       {"checkpoint-every", "checkpoint every N optimizer steps (0: at the end only)", &checkpoint_every, 0},
       {"checkpoint-dir", "checkpoints go here; the newest is resumed from (empty: none)", nullptr, 1,
        nullptr, &checkpoint_dir},
       {"warmup", "steps of linear learning-rate warm-up before the cosine decay", &warmup, 0},
       {"kill-at-step", "raise SIGKILL at this step, to try resuming (0: never)", &kill_at_step, 0},
       {"kill-rank", "with --kill-at-step: only on this rank (-1: every rank)", &kill_rank, -1},
       {"kill-attempts", "with --kill-at-step: only in the first N attempts of a restarted job "
                         "(FABRIC_RESTART_COUNT < N; 0: in every attempt)", &kill_attempts, 0}});
  double clip_norm = 0;
  try {
    clip_norm = std::stod(clip);
  } catch (const std::exception&) {
    clip_norm = -1;
  }
  if (!(clip_norm >= 0)) {
    std::cerr << "error: --clip must be a number >= 0, got '" << clip << "'" << std::endl;
    return 2;
  }

  auto kill = std::make_shared<KillAt>(kill_at_step, kill_rank, kill_attempts);
  args.fabric.callbacks.push_back(kill);
  fabric::Fabric fabric(args.fabric);
  fabric.launch();
  fabric.seed_everything(args.seed);

  auto full = fabric::data::load_fashion_mnist(fabric::data::Split::kTrain);
  auto order = torch::randperm(60000, at::make_generator<at::CPUGeneratorImpl>(args.seed), torch::kLong);
  auto train_set = full.select(order.slice(0, 0, 55000));
  auto val_set = full.select(order.slice(0, 55000));
  auto test_set = fabric::data::load_fashion_mnist(fabric::data::Split::kTest);

  auto model = fabric.init_module<ClassifierImpl>();
  // AdamW's default eps (1e-8) is 0 in fp16: an all-fp16 model needs one fp16 holds.
  const double eps = fabric.precision().name() == "16-true" ? 1e-4 : 1e-8;
  auto optimizer = std::make_shared<torch::optim::AdamW>(
      model->parameters(), torch::optim::AdamWOptions(args.lr).weight_decay(0.01).eps(eps));
  auto [net, opt] = fabric.setup(model, optimizer);
  auto train_loader = fabric.setup_dataloader(train_set, {.batch_size = args.batch_size, .shuffle = true});
  auto val_loader = fabric.setup_dataloader(val_set, {.batch_size = 500});
  auto test_loader = fabric.setup_dataloader(test_set, {.batch_size = 1000});

  TrainerOptions options{.max_epochs = args.epochs,
                         .max_steps = args.max_steps,
                         .accumulate_grad_batches = accumulate,
                         .val_every_n_steps = val_every,
                         .log_every_n_steps = args.log_every,
                         .checkpoint_dir = checkpoint_dir,
                         .checkpoint_every_n_steps = checkpoint_every,
                         .progress = args.progress};
  if (clip_norm > 0) options.gradient_clip_norm = clip_norm;
  // Linear warm-up to --lr, then cosine decay to a tenth of it at the last step.
  const int64_t total = Trainer<ClassifierImpl>(fabric, options).last_step(
      static_cast<int64_t>(train_loader.size()));
  const double peak = args.lr;
  options.lr_schedule = [=](int64_t step) {
    if (step < warmup) return peak * static_cast<double>(step + 1) / static_cast<double>(warmup);
    const double progress = static_cast<double>(step - warmup) / static_cast<double>(std::max<int64_t>(1, total - warmup));
    return peak * (0.1 + 0.9 * 0.5 * (1 + std::cos(M_PI * std::min(1.0, progress))));
  };
  fabric.log_hyperparams({{"lr", args.lr}, {"batch_size", args.batch_size}, {"accumulate", accumulate},
                          {"clip", clip_norm}, {"warmup", warmup}, {"precision", fabric.precision().name()},
                          {"strategy", fabric.strategy().name()}});

  Trainer<ClassifierImpl> trainer(fabric, options);
  kill->trainer = &trainer;
  auto loss_of = [](fabric::FabricModule<ClassifierImpl>& model, const torch::data::Example<>& batch) {
    return torch::cross_entropy_loss(model(batch.data).to(torch::kFloat), batch.target);
  };
  trainer.fit(net, opt, train_loader, &val_loader, loss_of, loss_of);

  net->eval();
  torch::NoGradGuard no_grad;
  int64_t correct = 0, count = 0;
  for (auto& batch : test_loader) {
    correct += net(batch.data).argmax(1).eq(batch.target).sum().item<int64_t>();
    count += batch.target.size(0);
  }
  if (!args.checkpoint.empty()) fabric.save(args.checkpoint, {{"model", net}});
  const double accuracy = fabric.all_reduce(static_cast<double>(correct), "sum") /
                          fabric.all_reduce(static_cast<double>(count), "sum");
  fabric.print("test accuracy: ", std::fixed, std::setprecision(4), accuracy);
  return 0;
}

int main(int argc, char** argv) { return examples::run_main(run, argc, argv); }
