// A trainer of one's own, built only on Fabric's public API: what Lightning's
// "build your own trainer" example does, in C++. Copy it and change what your
// project needs; nothing in torchfabric depends on it.
//
//   Trainer<ClassifierImpl> trainer(fabric, {.max_epochs = 5, .accumulate_grad_batches = 2});
//   trainer.fit(net, opt, train_loader, &val_loader, training_step, validation_step);
//
// fit() runs epochs of optimizer steps until max_epochs or max_steps, with
//   - gradient accumulation: the backward passes of a window run inside
//     fabric.no_backward_sync (no all-reduce), the last one synchronises;
//   - gradient clipping by total norm (fabric.clip_gradients unscales first);
//   - a learning-rate schedule: a function of the optimizer step, applied to
//     every parameter group before each step (stateless, so resuming needs
//     nothing but the step);
//   - validation every N steps and at each epoch's end, unless it just ran (mean
//     loss over all ranks);
//   - checkpoints every N steps and at the end in checkpoint_dir (step-N.ckpt,
//     written atomically by fabric.save), and on start the newest one there is
//     loaded: model, optimizer, step, epoch, position in the epoch, RNG state;
//   - callbacks through fabric.call (on_train_start, on_train_epoch_start,
//     on_train_batch_end, on_validation_end, on_train_epoch_end, on_train_end),
//     metrics through fabric.log (train_loss, lr, val_loss), and the progress bar.
// It works unchanged with every strategy and precision Fabric offers.
#pragma once

#include <torch/torch.h>

#include <algorithm>
#include <functional>
#include <optional>
#include <regex>
#include <string>

#include "fabric/fabric.h"
#include "checkpoint/filesystem.h"
#include "loggers/progress_bar.h"

struct TrainerOptions {
  int64_t max_epochs = 10;
  int64_t max_steps = -1;                // optimizer steps; < 0: no limit
  int64_t accumulate_grad_batches = 1;   // batches per optimizer step
  std::optional<double> gradient_clip_norm;  // clip the total gradient norm to this
  int64_t val_every_n_steps = 0;         // 0: only at each epoch's end
  int64_t log_every_n_steps = 50;
  std::string checkpoint_dir;            // empty: no checkpoints, no resume
  int64_t checkpoint_every_n_steps = 0;  // 0: only at the end
  std::function<double(int64_t step)> lr_schedule;  // empty: keep the optimizer's lr
  fabric::ProgressMode progress = fabric::ProgressMode::kAuto;
};

template <typename Model>
class Trainer {
 public:
  using Batch = torch::data::Example<>;
  // The loss of one batch; the trainer calls backward on it.
  using StepFn = std::function<torch::Tensor(fabric::FabricModule<Model>&, const Batch&)>;

  Trainer(fabric::Fabric& fabric, TrainerOptions options) : fabric_(fabric), options_(std::move(options)) {
    if (options_.accumulate_grad_batches < 1) {
      throw std::invalid_argument("accumulate_grad_batches must be at least 1, got " +
                                  std::to_string(options_.accumulate_grad_batches));
    }
    if (options_.max_epochs < 1) {
      throw std::invalid_argument("max_epochs must be at least 1, got " + std::to_string(options_.max_epochs));
    }
    if (options_.log_every_n_steps < 1) {
      throw std::invalid_argument("log_every_n_steps must be at least 1, got " +
                                  std::to_string(options_.log_every_n_steps));
    }
  }

  int64_t global_step() const { return step_; }

  // The optimizer step fit() stops at: max_epochs full epochs of whole
  // accumulation windows, capped by max_steps.
  int64_t last_step(int64_t batches_per_epoch) const {
    int64_t last = options_.max_epochs * (batches_per_epoch / options_.accumulate_grad_batches);
    return options_.max_steps >= 0 ? std::min(last, options_.max_steps) : last;
  }

  template <typename Loader>
  void fit(fabric::FabricModule<Model>& model, fabric::FabricOptimizer& optimizer, Loader& train_loader,
           Loader* val_loader, const StepFn& training_step, const StepFn& validation_step) {
    resume(model, optimizer);
    const int64_t steps_per_epoch =
        static_cast<int64_t>(train_loader.size()) / options_.accumulate_grad_batches;
    const int64_t last_step = this->last_step(static_cast<int64_t>(train_loader.size()));
    fabric::ProgressBar bar({.mode = options_.progress, .total = last_step}, fabric_.is_global_zero());
    fabric_.call("on_train_start");
    while (!done(last_step) && epoch_ < options_.max_epochs) {
      fabric_.call("on_train_epoch_start");
      model->train();
      train_loader.set_epoch(epoch_);
      int64_t batch_index = 0;
      for (auto& batch : train_loader) {
        if (batch_index++ < batches_done_) continue;  // trained on before a resume
        // A window's last batch synchronises gradients; a window cut short by the
        // epoch's end is dropped (as Lightning drops an incomplete last window).
        const int64_t in_window = batches_done_ % options_.accumulate_grad_batches;
        if (batches_done_ + (options_.accumulate_grad_batches - in_window) >
            steps_per_epoch * options_.accumulate_grad_batches) {
          break;
        }
        const bool accumulating = in_window + 1 < options_.accumulate_grad_batches;
        torch::Tensor loss;
        {
          auto no_sync = fabric_.no_backward_sync(model, accumulating);
          loss = training_step(model, batch);
          fabric_.backward(loss / static_cast<double>(options_.accumulate_grad_batches));
        }
        ++batches_done_;
        if (accumulating) continue;
        optimizer_step(model, optimizer);
        const double value = loss.template item<double>();
        if (step_ % options_.log_every_n_steps == 0) {
          fabric_.log_dict({{"train_loss", value}, {"lr", current_lr(optimizer)}}, step_);
        }
        bar.update(step_, {{"loss", value}}, "epoch " + std::to_string(epoch_));
        fabric_.call("on_train_batch_end");
        if (val_loader && options_.val_every_n_steps > 0 && step_ % options_.val_every_n_steps == 0) {
          bar.close();
          validate(model, *val_loader, validation_step);
        }
        if (options_.checkpoint_every_n_steps > 0 && step_ % options_.checkpoint_every_n_steps == 0) {
          save(model, optimizer);
        }
        if (done(last_step)) break;
      }
      bar.close();
      const bool finished_epoch = !done(last_step) || batches_done_ >= steps_per_epoch * options_.accumulate_grad_batches;
      if (val_loader && validated_at_ != step_) validate(model, *val_loader, validation_step);
      fabric_.call("on_train_epoch_end");
      if (finished_epoch) {
        ++epoch_;
        batches_done_ = 0;
      }
    }
    if (saved_at_ != step_) save(model, optimizer);
    fabric_.call("on_train_end");
  }

  // The mean validation loss over every rank's batches.
  template <typename Loader>
  double validate(fabric::FabricModule<Model>& model, Loader& loader, const StepFn& validation_step) {
    torch::NoGradGuard no_grad;
    model->eval();
    double sum = 0;
    int64_t count = 0;
    for (auto& batch : loader) {
      sum += validation_step(model, batch).template item<double>();
      ++count;
    }
    model->train();
    const double loss = fabric_.all_reduce(sum, "sum") / std::max(1.0, fabric_.all_reduce(static_cast<double>(count), "sum"));
    fabric_.log("val_loss", loss, step_);
    validated_at_ = step_;
    fabric_.print("epoch ", epoch_, " step ", step_, ": val_loss ", loss);
    fabric_.call("on_validation_end");
    return loss;
  }

 private:
  bool done(int64_t last_step) const { return step_ >= last_step; }

  void optimizer_step(fabric::FabricModule<Model>& model, fabric::FabricOptimizer& optimizer) {
    if (options_.gradient_clip_norm) {
      fabric_.clip_gradients(model, optimizer, {.max_norm = *options_.gradient_clip_norm});
    }
    if (options_.lr_schedule) {
      const double lr = options_.lr_schedule(step_);
      for (auto& group : optimizer.optimizer()->param_groups()) group.options().set_lr(lr);
    }
    optimizer.step();
    optimizer.zero_grad();
    ++step_;
  }

  static double current_lr(fabric::FabricOptimizer& optimizer) {
    return optimizer.optimizer()->param_groups().front().options().get_lr();
  }

  fabric::State state(fabric::FabricModule<Model>& model, fabric::FabricOptimizer& optimizer) {
    return {{"model", model}, {"optimizer", optimizer}, {"step", step_}, {"epoch", epoch_},
            {"batches_done", batches_done_}, {"rng", fabric::RngState::capture()}};
  }

  void save(fabric::FabricModule<Model>& model, fabric::FabricOptimizer& optimizer) {
    if (options_.checkpoint_dir.empty()) return;
    const auto path = options_.checkpoint_dir + "/step-" + std::to_string(step_) + ".ckpt";
    fabric_.save(path, state(model, optimizer));
    saved_at_ = step_;
  }

  // Loads the newest step-N.ckpt in checkpoint_dir, if there is one. Rank 0
  // chooses and tells the others: ranks that listed the folder themselves could
  // see different files (node-local disks, a network filesystem's stale cache)
  // and resume from different steps, which diverges or hangs. A rank that lacks
  // the chosen file fails the resume on every rank, naming it.
  void resume(fabric::FabricModule<Model>& model, fabric::FabricOptimizer& optimizer) {
    if (options_.checkpoint_dir.empty()) return;
    int64_t newest = -1;
    if (fabric_.is_global_zero()) {
      const std::regex name("step-([0-9]{1,18})\\.ckpt");
      for (const auto& file : fabric::fs::list_directory(options_.checkpoint_dir)) {
        std::smatch match;
        if (std::regex_match(file, match, name)) newest = std::max<int64_t>(newest, std::stoll(match[1]));
      }
    }
    newest = fabric_.broadcast(c10::IValue(newest), 0).toInt();
    if (newest < 0) return;
    const std::string path =
        fabric::fs::join(options_.checkpoint_dir, "step-" + std::to_string(newest) + ".ckpt");
    const auto missing = fabric_.all_gather(
        torch::tensor({fabric::fs::exists(path) ? 0.0f : 1.0f}, torch::kFloat));
    std::string ranks;
    for (int64_t r = 0; r < missing.size(0); ++r) {
      if (missing[r].item<float>() > 0) ranks += (ranks.empty() ? "" : ", ") + std::to_string(r);
    }
    if (!ranks.empty()) {
      throw std::runtime_error("resume: rank 0 chose " + path + ", which rank(s) " + ranks +
                               " cannot read; give every rank the same checkpoint folder (a "
                               "shared filesystem) or copy the checkpoint there");
    }
    fabric::State loaded{{"model", model}, {"optimizer", optimizer}, {"step", 0}, {"epoch", 0},
                         {"batches_done", 0}, {"rng", fabric::RngState()}};
    // A rank whose copy is damaged must not leave the others waiting in their
    // next collective: every rank learns whether any load failed.
    std::string error;
    try {
      fabric_.load(path, loaded);
    } catch (const std::exception& e) {
      error = e.what();
    }
    if (fabric_.all_reduce(error.empty() ? 0.0 : 1.0, "max") > 0) {
      throw std::runtime_error(error.empty() ? "resume: another rank could not load " + path
                                             : "resume: " + error);
    }
    step_ = loaded.at("step").to_int();
    epoch_ = loaded.at("epoch").to_int();
    batches_done_ = loaded.at("batches_done").to_int();
    fabric_.print("resumed from ", path, " at step ", step_);
  }

  fabric::Fabric& fabric_;
  TrainerOptions options_;
  int64_t step_ = 0, epoch_ = 0;
  int64_t batches_done_ = 0;  // batches of the current epoch already trained on
  int64_t validated_at_ = -1;  // the step of the last validation
  int64_t saved_at_ = -1;      // the step of the last checkpoint
};
