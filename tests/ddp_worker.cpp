// A program the distributed tests start in several ways (Fabric spawn, fabric-run,
// mpirun, torchrun-style variables). Usage:
//   ddp_worker MODE OUTDIR [--devices N] [--timeout SECONDS] [--accelerator cpu|cuda]
//              [--strategy ddp|fsdp] [--sharding FULL_SHARD|SHARD_GRAD_OP|NO_SHARD]
//   (under fsdp every mode also checks that parameters and Adam state at rest
//   hold only this rank's shard; exit 3 otherwise)
// MODE:
//   train_view   the same with gradient_as_bucket_view
//   train        10 Adam steps of DDP on this rank's half of a global batch; rank r
//                writes its final parameters to OUTDIR/params_rank<r>.pt
//   init_module  train, with the model built by fabric.init_module before setup;
//                exits 3 unless every backward all-reduces each bucket exactly once
//   clip         train, clipping gradients to a total norm of 0.05 every step
//   accumulate   the same with 4 micro-batches per step, the first 3 under
//                no_backward_sync
//   checkpoint   5 steps, save, fresh model and optimizer on every rank load the
//                checkpoint, 5 more steps; writes params like train
//   unused       a model whose `extra` layer only rank 1 uses, at even steps
//                (find_unused on, AdamW with weight decay 0.1: a parameter no
//                rank used must keep an undefined gradient and not move)
//   sweep        two trials with one Fabric (seeds 0 and 1), the second model built
//                at the first one's address after it was destroyed; writes
//                OUTDIR/params_trial<t>_rank<r>.pt
//   collectives  checks every collective's values; exits 3 on a wrong value
//   large        broadcast, all-reduce, all-gather and reduce-scatter of tensors
//                whose byte or element counts exceed INT_MAX (2 GiB of uint8);
//                exits 3 on a wrong value
//   slow         trains forever (slowly) after writing OUTDIR/pid_rank<r>
//   nojoin       rank 1 never calls launch(); the others wait --timeout seconds
//   tp_layers    (--strategy model_parallel) fabric::tp's layers and
//                vocab_parallel_cross_entropy against the plain layers they were
//                built from: outputs, loss and gradient slices; exits 3 on a mismatch
//   tp_clip      clip, with the MLP's layers column- and row-parallel over the
//                tensor-parallel group (--tensor-parallel-size, --data-parallel);
//                each data-parallel rank trains on its part of the batch; writes
//                params like train, and exits 3 unless every rank's clipping norm
//                is the single-process one
//   tp_scaler    tp_train's model under a loss-scaling plugin: an inf put into
//                one tensor-parallel rank's gradient must skip the step on every
//                rank; exits 3 otherwise
#include <torch/torch.h>

#include <ATen/CPUGeneratorImpl.h>

#include <chrono>
#include <fstream>
#include <iostream>
#include <thread>
#include <unistd.h>

#include "ddp_model.h"
#include "fabric/fabric.h"
#include "precision/grad_scaler.h"
#include "precision/mixed_precision.h"
#include "strategies/ddp.h"
#include "strategies/model_parallel/tensor_parallel.h"
#include "strategies/parallel.h"

namespace {

void save_params(fabric::Fabric& fabric, torch::nn::Module& model, const std::string& path) {
  // Full parameters whatever the strategy (fsdp keeps only shards between steps).
  auto full = fabric.strategy().full_state_context({&model}, {}, /*loading=*/false);
  c10::List<torch::Tensor> list;
  for (const auto& p : model.parameters()) list.push_back(p.detach().cpu());
  auto bytes = torch::pickle_save(c10::IValue(list));
  std::ofstream(path, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

int fail(const std::string& what) {
  std::cerr << "collectives check failed: " << what << std::endl;
  return 3;
}

// Memory for one model at a time, so a sweep's next model lives exactly where
// the last one did (as the allocator often arranges by itself).
alignas(64) unsigned char g_model_arena[1 << 16];

std::shared_ptr<DdpMlpImpl> model_in_arena() {
  static_assert(sizeof(DdpMlpImpl) <= sizeof(g_model_arena));
  return std::shared_ptr<DdpMlpImpl>(new (g_model_arena) DdpMlpImpl(false),
                                     [](DdpMlpImpl* m) { m->~DdpMlpImpl(); });
}

// Large mode: every collective past MPI's int counts, values checked around
// the 1 GiB piece boundaries and at both ends.
int large(fabric::Fabric& fabric) {
  const int64_t rank = fabric.global_rank(), world = fabric.world_size();
  const int64_t n = (int64_t{1} << 31) + 4099;  // elements (= bytes) per rank: past INT_MAX
  auto* parallel = dynamic_cast<fabric::strategies::ParallelStrategy*>(&fabric.strategy());
  if (!parallel) return fail("large: not a multi-process strategy");
  const auto check = [](const torch::Tensor& t, int64_t at, int64_t expected) {
    return t[at].item<int64_t>() == expected;
  };
  const std::vector<int64_t> probes = {0, (int64_t{1} << 30) - 1, int64_t{1} << 30,
                                       (int64_t{1} << 31) - 1, int64_t{1} << 31, n - 1};
  {  // broadcast: rank 0's pattern (index mod 251) everywhere
    auto t = torch::zeros({n}, torch::kByte);
    const auto pattern = [](int64_t at) { return (at >> 20) % 251; };  // one value per MiB
    if (rank == 0) {
      for (int64_t at = 0; at < n; at += int64_t{1} << 20) {
        t.narrow(0, at, std::min<int64_t>(int64_t{1} << 20, n - at)).fill_(pattern(at));
      }
    }
    t = fabric.broadcast(t, 0);
    for (auto at : probes) if (!check(t, at, pattern(at))) return fail("broadcast at " + std::to_string(at));
  }
  {  // all-reduce (sum) of ones into every rank's count
    auto t = torch::ones({n}, torch::kByte);
    t = fabric.all_reduce(t, "sum");
    for (auto at : probes) if (!check(t, at, world)) return fail("all_reduce at " + std::to_string(at));
  }
  {  // all-gather: rank r's block holds r + 1
    auto in = torch::full({n}, rank + 1, torch::kByte);
    auto out = torch::empty({world * n}, torch::kByte);
    parallel->backend()._allgather_base(out, in)->wait();
    in = torch::Tensor();
    for (int64_t r = 0; r < world; ++r) {
      for (auto at : probes) {
        if (!check(out, r * n + at, r + 1)) return fail("all_gather of rank " + std::to_string(r) + " at " + std::to_string(at));
      }
    }
  }
  {  // reduce-scatter (sum): block b of every rank holds b + 1 + rank
    auto in = torch::empty({world * n}, torch::kByte);
    for (int64_t b = 0; b < world; ++b) in.narrow(0, b * n, n).fill_(b + 1 + rank);
    auto out = torch::empty({n}, torch::kByte);
    c10d::ReduceScatterOptions opts;
    parallel->backend()._reduce_scatter_base(out, in, opts)->wait();
    const int64_t expected = world * (rank + 1) + world * (world - 1) / 2;
    for (auto at : probes) if (!check(out, at, expected)) return fail("reduce_scatter at " + std::to_string(at));
  }
  fabric.print("large collectives ok");
  return 0;
}

// Sweep mode: each trial sets up a fresh model and optimizer with the same
// Fabric, trains 10 steps and writes its parameters.
int sweep(fabric::Fabric& fabric, const std::string& out) {
  const int64_t rank = fabric.global_rank(), per_rank = 16 / fabric.world_size();
  const void* first_address = nullptr;
  for (int trial = 0; trial < 2; ++trial) {
    torch::manual_seed(trial);
    auto model = model_in_arena();
    if (trial == 0) first_address = model.get();
    if (model.get() != first_address) return fail("the sweep's second model is at another address");
    if (rank != 0) {  // different initial weights: setup must broadcast rank 0's
      torch::NoGradGuard no_grad;
      for (auto& p : model->parameters()) p.add_(1.0);
    }
    auto optimizer = std::make_shared<torch::optim::Adam>(model->parameters(), 1e-2);
    auto [net, opt] = fabric.setup(model, optimizer);
    for (int step = 0; step < 10; ++step) {
      auto [x, y] = ddp_global_batch(step);
      opt.zero_grad();
      fabric.backward(torch::mse_loss(net(x.narrow(0, rank * per_rank, per_rank)),
                                      y.narrow(0, rank * per_rank, per_rank)));
      opt.step();
    }
    save_params(fabric, *model, out + "/params_trial" + std::to_string(trial) + "_rank" +
                                    std::to_string(rank) + ".pt");
  }
  return 0;
}

namespace tp = fabric::tp;

bool close(const torch::Tensor& a, const torch::Tensor& b) {
  return a.sizes() == b.sizes() && torch::allclose(a, b, /*rtol=*/1e-5, /*atol=*/1e-6);
}

// tp_layers: every rank also computes the plain layers, and compares.
int tensor_parallel_layers(fabric::Fabric& fabric) {
  const auto group = tp::tensor_parallel_group(fabric.strategy());
  if (group.size < 2) return fail("tp_layers needs a tensor-parallel group of 2 or more");
  torch::manual_seed(0);
  torch::nn::Embedding emb_full(16, 6);
  torch::nn::Linear col_full(6, 8), row_full(8, 6), head_full(6, 16);
  tp::VocabParallelEmbedding emb(group, emb_full);
  tp::ColumnParallelLinear col(group, col_full, tp::ColumnParallelLinearOptions{.gather_output = true});
  tp::RowParallelLinear row(group, row_full, tp::RowParallelLinearOptions{.input_is_parallel = false});
  tp::ColumnParallelLinear head(group, head_full);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(5);
  auto ids = torch::randint(16, {5, 3}, gen), targets = torch::randint(16, {5, 3}, gen);

  auto a = col_full(emb_full(ids));
  auto b = row_full(torch::tanh(a));
  auto logits = head_full(b);
  auto loss = torch::cross_entropy_loss(logits.view({-1, 16}), targets.view({-1}));
  loss.backward();

  auto a2 = col(emb(ids));
  auto b2 = row(torch::tanh(a2));
  auto logits2 = head(b2);
  auto loss2 = tp::vocab_parallel_cross_entropy(logits2, targets, group);
  loss2.backward();

  const auto slice = [&](const torch::Tensor& t, int64_t dim) {
    return tp::shard_of(t, {dim, 1}, group.rank, group.size);
  };
  if (!close(a2, a)) return fail("ColumnParallelLinear with gather_output: outputs differ");
  if (!close(b2, b)) return fail("RowParallelLinear on a whole input: outputs differ");
  if (!close(logits2, slice(logits, 2))) return fail("ColumnParallelLinear: this rank's outputs differ");
  if (!close(loss2, loss)) {
    return fail("vocab_parallel_cross_entropy " + std::to_string(loss2.item<double>()) +
                " != cross_entropy " + std::to_string(loss.item<double>()));
  }
  if (!close(head->weight.grad(), slice(head_full->weight.grad(), 0))) return fail("head weight gradient");
  if (!close(row->weight.grad(), slice(row_full->weight.grad(), 1))) return fail("row weight gradient");
  if (!close(row->bias.grad(), row_full->bias.grad())) return fail("row bias gradient");
  if (!close(col->weight.grad(), slice(col_full->weight.grad(), 0))) return fail("column weight gradient");
  if (!close(col->bias.grad(), slice(col_full->bias.grad(), 0))) return fail("column bias gradient");
  if (!close(emb->weight.grad(), slice(emb_full->weight.grad(), 0))) return fail("embedding gradient");

  // Dropout inside a split region: each rank its own masks, the same ones again
  // after the same seed; the default generator (replicated regions) untouched.
  torch::manual_seed(11);
  tp::manual_seed_parallel_region(group, 42);
  auto ones = torch::ones({256});
  auto first = tp::dropout(ones, 0.5, /*training=*/true, group);
  const auto replicated = torch::rand({4});
  tp::manual_seed_parallel_region(group, 42);
  auto again = tp::dropout(ones, 0.5, true, group);
  torch::manual_seed(11);
  if (!torch::equal(torch::rand({4}), replicated)) return fail("tp::dropout drew from the default generator");
  if (!torch::equal(first, again)) return fail("tp::dropout: the same seed gave other masks");
  if (!torch::equal(first.eq(0).logical_or(first.eq(2)).all(), torch::tensor(true))) {
    return fail("tp::dropout: values other than 0 and 1/(1-p)");
  }
  auto masks = tp::all_gather(group, first);
  if (torch::equal(masks[0], masks[1])) return fail("tp::dropout: two tensor-parallel ranks drew the same mask");
  if (!torch::equal(tp::dropout(ones, 0.5, /*training=*/false, group), ones)) return fail("tp::dropout in eval");
  fabric.print("tp layers ok");
  return 0;
}

// DdpMlp's layers split over the tensor-parallel group (names and order unchanged).
struct TpMlpImpl : torch::nn::Module {
  TpMlpImpl(const tp::Group& group, const DdpMlpImpl& full)
      : fc1(register_module("fc1", tp::ColumnParallelLinear(group, full.fc1))),
        fc2(register_module("fc2", tp::RowParallelLinear(group, full.fc2))) {}
  torch::Tensor forward(torch::Tensor x) { return fc2->forward(torch::tanh(fc1->forward(x))); }
  tp::ColumnParallelLinear fc1;
  tp::RowParallelLinear fc2;
};

int tensor_parallel_training(fabric::Fabric& fabric, const std::string& mode, const std::string& out) {
  const int64_t rank = fabric.global_rank();
  const auto group = tp::tensor_parallel_group(fabric.strategy());
  const int64_t dp_rank = fabric.strategy().data_parallel_rank();
  const int64_t per_rank = 16 / fabric.strategy().data_parallel_size();
  torch::manual_seed(0);
  DdpMlpImpl reference;
  auto model = std::make_shared<TpMlpImpl>(group, reference);
  if (rank != 0) {  // replicated parameters must come from rank 0 at setup
    torch::NoGradGuard no_grad;
    model->fc2->bias.add_(1.0);
  }
  auto optimizer = std::make_shared<torch::optim::Adam>(model->parameters(), 1e-2);
  torch::optim::Adam reference_opt(reference.parameters(), 1e-2);
  auto [net, opt] = fabric.setup(model, optimizer);
  auto* scaler = fabric.precision().scaler();
  if (mode == "tp_scaler" && !scaler) return fail("tp_scaler: the precision plugin has no GradScaler");
  for (int step = 0; step < 10; ++step) {
    auto [x, y] = ddp_global_batch(step);
    auto xs = x.narrow(0, dp_rank * per_rank, per_rank), ys = y.narrow(0, dp_rank * per_rank, per_rank);
    opt.zero_grad();
    fabric.backward(torch::mse_loss(net(xs), ys));
    reference_opt.zero_grad();
    torch::mse_loss(reference.forward(x), y).backward();
    if (mode == "tp_clip") {
      const double norm = fabric.clip_gradients(net, opt, {.max_norm = 0.05}).value_or(-1);
      const double expected = torch::nn::utils::clip_grad_norm_(reference.parameters(), 0.05);
      if (std::abs(norm - expected) > 1e-5 * expected) {
        return fail("step " + std::to_string(step) + ": clip_gradients' norm " + std::to_string(norm) +
                    ", the single-process norm " + std::to_string(expected));
      }
    }
    if (mode == "tp_scaler" && step == 3) {
      // An overflow on one tensor-parallel rank only: every rank must skip.
      const double scale = scaler->get_scale();
      std::vector<torch::Tensor> before;
      for (const auto& p : model->parameters()) before.push_back(p.detach().clone());
      if (group.rank == 1 && model->fc1->weight.grad().numel() > 0) {
        model->fc1->weight.mutable_grad().view({-1})[0] = std::numeric_limits<float>::infinity();
      }
      opt.step();
      size_t i = 0;
      for (const auto& p : model->parameters()) {
        if (!torch::equal(p.detach(), before[i++])) return fail("a step with an inf on one rank moved a parameter");
      }
      if (!(scaler->get_scale() < scale)) return fail("the scale did not fall after an inf");
      continue;  // the reference skips this step too
    }
    opt.step();
    reference_opt.step();
  }
  save_params(fabric, *model, out + "/params_rank" + std::to_string(rank) + ".pt");
  fabric.print(mode, " ok");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: ddp_worker MODE OUTDIR [--devices N] [--timeout SECONDS] "
                 "[--collective-timeout SECONDS]" << std::endl;
    return 2;
  }
  const std::string mode = argv[1], out = argv[2];
  fabric::FabricOptions options;
  options.accelerator = "cpu";
  for (int i = 3; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--devices") options.devices = fabric::Devices(std::string(argv[i + 1]));
    if (flag == "--timeout") options.timeout = std::chrono::seconds(std::stoi(argv[i + 1]));
    if (flag == "--collective-timeout") {
      options.collective_timeout = std::chrono::seconds(std::stoi(argv[i + 1]));
    }
    if (flag == "--accelerator") options.accelerator = argv[i + 1];
    if (flag == "--strategy") options.strategy = argv[i + 1];
    if (flag == "--sharding") options.fsdp.sharding_strategy = argv[i + 1];
    if (flag == "--tensor-parallel-size") {
      options.model_parallel.tensor_parallel_size = std::stoi(argv[i + 1]);
    }
    if (flag == "--data-parallel") options.model_parallel.data_parallel = argv[i + 1];
  }
  if (mode == "tp_scaler") {
    // Loss scaling on the CPU: bf16 autocast with a GradScaler (fp32 gradients).
    options.precision_plugin = std::make_shared<fabric::precision::MixedPrecision>(
        c10::ScalarType::BFloat16, c10::DeviceType::CPU,
        std::make_unique<fabric::precision::GradScaler>());
  }
  options.ddp.find_unused_parameters = mode == "unused";
  options.ddp.gradient_as_bucket_view = mode == "train_view";
  try {
    fabric::Fabric fabric(options);
    if (mode == "nojoin") {
      const char* rank = std::getenv("OMPI_COMM_WORLD_RANK");
      if (rank && std::string(rank) == "1") {
        std::this_thread::sleep_for(std::chrono::minutes(10));
        return 0;
      }
    }
    fabric.launch();
    const int64_t rank = fabric.global_rank(), world = fabric.world_size();

    if (mode == "collectives") {
      auto t = torch::full({3}, static_cast<double>(rank + 1));
      if (!torch::equal(fabric.all_reduce(t.clone(), "sum"), torch::full({3}, world * (world + 1) / 2.0)))
        return fail("sum");
      if (!torch::allclose(fabric.all_reduce(t.clone(), "mean"), torch::full({3}, (world + 1) / 2.0)))
        return fail("mean");
      if (!torch::equal(fabric.all_reduce(t.clone(), "max"), torch::full({3}, double(world))))
        return fail("max");
      if (!torch::equal(fabric.all_reduce(t.clone(), "min"), torch::full({3}, 1.0))) return fail("min");
      if (fabric.all_reduce(static_cast<double>(rank), "sum") != world * (world - 1) / 2.0)
        return fail("scalar sum");
      auto ints = torch::full({2}, rank + 5, torch::kLong);
      if (!torch::equal(fabric.all_reduce(ints, "max"), torch::full({2}, world + 4, torch::kLong)))
        return fail("int max");
      auto gathered = fabric.all_gather(torch::full({2, 2}, static_cast<float>(rank)));
      if (gathered.sizes() != std::vector<int64_t>{world, 2, 2}) return fail("all_gather shape");
      for (int64_t r = 0; r < world; ++r) {
        if (!torch::equal(gathered[r], torch::full({2, 2}, static_cast<float>(r))))
          return fail("all_gather values");
      }
      auto b = fabric.broadcast(torch::full({4}, static_cast<float>(rank * 10)), world - 1);
      if (!torch::equal(b, torch::full({4}, static_cast<float>((world - 1) * 10))))
        return fail("broadcast tensor");
      auto text = fabric.broadcast(rank == 0 ? std::string("hello from rank 0") : std::string(), 0);
      if (text != "hello from rank 0") return fail("broadcast string: " + text);
      c10::Dict<std::string, int64_t> dict;
      dict.insert("epoch", 7);
      auto value = fabric.broadcast(rank == 0 ? c10::IValue(dict) : c10::IValue(), 0);
      if (!value.isGenericDict() || value.toGenericDict().at("epoch").toInt() != 7)
        return fail("broadcast value");
      // rank_zero_first: rank 0 writes a file the others then read.
      const std::string marker = out + "/rank_zero_first.txt";
      {
        auto guard = fabric.rank_zero_first();
        if (rank == 0) {
          std::this_thread::sleep_for(std::chrono::milliseconds(300));
          std::ofstream(marker) << "ready";
        } else {
          std::ifstream in(marker);
          std::string word;
          in >> word;
          if (word != "ready") return fail("rank_zero_first: rank 0 had not finished");
        }
      }
      fabric.barrier();
      fabric.print("collectives ok on ", world, " ranks");
      return 0;
    }

    // Stall detection: after a first barrier, rank 1 is late for the second by
    // DELAY seconds (FABRIC_TEST_DELAY; 120 by default, i.e. it never comes).
    if (mode == "late_barrier") {
      fabric.barrier();
      if (rank == 1) {
        const char* delay = std::getenv("FABRIC_TEST_DELAY");
        std::this_thread::sleep_for(std::chrono::seconds(delay ? std::atoi(delay) : 120));
      }
      fabric.barrier();
      fabric.print("late_barrier done");
      return 0;
    }
    if (mode == "sweep") return sweep(fabric, out);
    if (mode == "tp_layers") return tensor_parallel_layers(fabric);
    if (mode == "tp_clip" || mode == "tp_scaler") return tensor_parallel_training(fabric, mode, out);
    if (mode == "large") return large(fabric);
    torch::manual_seed(0);
    auto model = mode == "init_module" ? fabric.init_module<DdpMlpImpl>(false)
                                       : std::make_shared<DdpMlpImpl>(mode == "unused");
    if (rank != 0) {  // different initial weights: setup must broadcast rank 0's
      torch::NoGradGuard no_grad;
      for (auto& p : model->parameters()) p.add_(1.0);
    }
    std::shared_ptr<torch::optim::Optimizer> optimizer;
    if (mode == "unused") {
      optimizer = std::make_shared<torch::optim::AdamW>(
          model->parameters(), torch::optim::AdamWOptions(1e-2).weight_decay(0.1));
    } else {
      optimizer = std::make_shared<torch::optim::Adam>(model->parameters(), 1e-2);
    }
    auto [net, opt] = fabric.setup(model, optimizer);
    const int64_t per_rank = 16 / world;

    if (mode == "slow") {
      std::ofstream(out + "/pid_rank" + std::to_string(rank)) << ::getpid();
      for (int step = 0;; ++step) {
        auto [x, y] = ddp_global_batch(step % 10);
        x = fabric.to_device(x);
        y = fabric.to_device(y);
        opt.zero_grad();
        fabric.backward(torch::mse_loss(net(x.narrow(0, rank * per_rank, per_rank)),
                                        y.narrow(0, rank * per_rank, per_rank)));
        opt.step();
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
      }
    }

    int first_step = 0;
    if (mode == "checkpoint") {
      for (int step = 0; step < 5; ++step) {
        auto [x, y] = ddp_global_batch(step);
        x = fabric.to_device(x);
        y = fabric.to_device(y);
        opt.zero_grad();
        fabric.backward(torch::mse_loss(net(x.narrow(0, rank * per_rank, per_rank)),
                                        y.narrow(0, rank * per_rank, per_rank)));
        opt.step();
      }
      const std::string path = out + "/ddp_checkpoint.pt";
      fabric.save(path, {{"model", net}, {"optimizer", opt}, {"step", 5}});
      // Scramble the live objects, then restore them from the file on every rank.
      {
        torch::NoGradGuard no_grad;
        for (auto& p : model->parameters()) p.uniform_();
      }
      optimizer->state().clear();
      fabric::State state{{"model", net}, {"optimizer", opt}, {"step", 0}};
      fabric.load(path, state);
      first_step = static_cast<int>(state.at("step").to_int());
    }
    for (int step = first_step; step < 10; ++step) {
      auto [x, y] = ddp_global_batch(step);
      x = fabric.to_device(x);
      y = fabric.to_device(y);
      auto xs = x.narrow(0, rank * per_rank, per_rank), ys = y.narrow(0, rank * per_rank, per_rank);
      opt.zero_grad();
      if (mode == "accumulate") {
        const int64_t micro = per_rank / 4;
        for (int m = 0; m < 4; ++m) {
          auto guard = fabric.no_backward_sync(net, /*enabled=*/m < 3);
          auto loss = torch::mse_loss(net(xs.narrow(0, m * micro, micro)),
                                      ys.narrow(0, m * micro, micro)) / 4;
          fabric.backward(loss);
        }
      } else if (mode == "unused") {
        auto out = net(xs);
        auto loss = torch::mse_loss(out, ys);
        if (ddp_extra_used(rank, step)) loss = loss + ddp_extra_term(*model, out);
        fabric.backward(loss);
        const bool anyone = step % 2 == 0;
        for (const auto& p : model->extra->parameters()) {
          if (p.grad().defined() != anyone) {
            return fail("step " + std::to_string(step) + ": extra's gradient is " +
                        (p.grad().defined() ? "defined" : "undefined") +
                        (anyone ? " though rank 1 used it" : " though no rank used it"));
          }
        }
      } else if (mode == "clip") {
        fabric.backward(torch::mse_loss(net(xs), ys));
        fabric.clip_gradients(net, opt, {.max_norm = 0.05});
      } else {
        auto* ddp = dynamic_cast<fabric::strategies::DDPStrategy*>(&fabric.strategy());
        if (ddp) ddp->reset_stats();
        fabric.backward(torch::mse_loss(net(xs), ys));
        if (mode == "init_module") {
          if (!ddp) return fail("init_module: the strategy is not ddp");
          const auto buckets = ddp->bucket_counts();
          if (buckets.size() != 1) {
            return fail("init_module + setup registered the module " +
                        std::to_string(buckets.size()) + " times");
          }
          if (ddp->stats().buckets_reduced != static_cast<int64_t>(buckets[0])) {
            return fail("one backward all-reduced " +
                        std::to_string(ddp->stats().buckets_reduced) + " buckets, the module has " +
                        std::to_string(buckets[0]));
          }
        }
      }
      opt.step();
    }
    if (fabric.strategy().name() == "fsdp" && options.fsdp.sharding_strategy != "NO_SHARD") {
      // Parameters, gradients and Adam state at rest: this rank's shard only.
      int64_t params = 0, grads = 0, state = 0, full = 0;
      for (const auto& p : model->parameters()) {
        params += p.numel();
        if (p.grad().defined()) grads += p.grad().numel();
        auto it = optimizer->state().find(p.unsafeGetTensorImpl());
        if (it != optimizer->state().end()) {
          auto& s = static_cast<torch::optim::AdamParamState&>(*it->second);
          state += s.exp_avg().numel() + s.exp_avg_sq().numel();
        }
      }
      {
        auto whole = fabric.strategy().full_state_context({model.get()}, {}, false);
        for (const auto& p : model->parameters()) full += p.numel();
      }
      const int64_t shard = (full + world - 1) / world;
      if (params != shard || grads != shard || state != 2 * shard) {
        return fail("fsdp at rest holds " + std::to_string(params) + " parameter, " +
                    std::to_string(grads) + " gradient and " + std::to_string(state) +
                    " Adam state elements; the shard has " + std::to_string(shard) + " of " +
                    std::to_string(full));
      }
    }
    save_params(fabric, *model, out + "/params_rank" + std::to_string(rank) + ".pt");
    auto [x0, y0] = ddp_global_batch(0);
    fabric.print("final loss ", torch::mse_loss(net(fabric.to_device(x0)), fabric.to_device(y0)).item<double>());
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << std::endl;
    return 1;
  }
}
