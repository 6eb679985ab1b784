// The program the fsdp tests start under `mpirun -np 2` (tests/fsdp_test.cpp).
//   fsdp_worker MODE OUTDIR [--strategy fsdp|ddp] [--sharding S] [--optimizer adam|adamw|sgd|fused_adam|fused_adamw|fused_sgd]
//               [--precision P] [--no-reshard] [--sequential] [--auto-wrap] [--width N]
//               [--state-dict full|sharded] [--from CHECKPOINT] [--fp16-scaler]
//               [--reduce-dtype fp32|bf16|fp16] [--accelerator cpu|cuda] [--devices N]
//               [--freeze b1,root,...] (requires_grad=false on those blocks / the root)
//               [--deepspeed-config FILE] [--bucket-size ELEMENTS] (deepspeed's reduce_bucket_size)
// --strategy also takes the deepspeed names (tests/deepspeed_test.cpp).
// MODE:
//   train       10 steps on this rank's half of each 16-row global batch
//   accumulate  the same in 2 micro-batches per step, the first under no_backward_sync
//   clip        train, clipping to a total norm of 0.05; OUTDIR/norms_rank<r>.pt
//               holds the norm of every step
//   save        train, saving {model, optimizer, step} to OUTDIR/ckpt after 5 steps
//               (a directory with --state-dict sharded; rank 0 then also writes
//               the full file OUTDIR/full.pt)
//   reload      load --from PATH, train nothing; rank 0 writes OUTDIR/reloaded.pt
//               (the model and optimizer as one full file); each rank writes
//               OUTDIR/load_memory_rank<r>.txt: the most bytes the load had
//               allocated at once beyond what was alive before it
//   resume      load --from PATH into a fresh model and optimizer, train the
//               remaining steps
//   inf         with --fp16-scaler: at step 3 rank 1 alone puts an inf into one of
//               its gradient pieces; exits 3 unless every rank skips that step
//               (parameters unchanged) with equal loss scales, and step 4 trains
//   mismatch    at the first step rank 1 runs unit b2 on its own while rank 0 runs the
//               model: both must fail naming the units (exit 1), not hang
//   optimizer_only  train; after 5 steps save {model, optimizer, step}, clear the
//               optimizer's state and load only the optimizer from the file
//   conditional the FsdpAuxNet: rank 1 alone adds its blocks' aux term to the loss
//               (those parameters get a gradient on one rank only); 10 steps
//   accumulate_partial  the FsdpAuxNet, 2 micro-batches per step, both synced (no
//               no_backward_sync); only the first one's loss uses the `side` unit
//   save_once   one step, then save {model, optimizer, step: --tag N} to OUTDIR/ckpt
//               and exit (the interrupted-save test kills it inside the save)
//   errors      checks the errors fsdp gives (a weight tied across two units, an
//               optimizer with state at setup); exits 3 when one is missing
//   ds_errors   the same for deepspeed stages 1-2 (a backward outside
//               fabric.backward, an optimizer with state, one of a module not set up)
//   memory      train; OUTDIR/memory_rank<r>.txt holds the distinct storage bytes of
//               parameters + gradients + optimizer state at rest, the bytes alive
//               in the CPU allocator at rest, and the allocator's peak during the
//               last step
// Every mode writes OUTDIR/params_rank<r>.pt (full parameters after training) and
// runs a forward without gradients after each step (as an evaluation would).
// Under fsdp it exits 3 when an invariant breaks: gathered buffers alive between
// steps, parameters at rest not this rank's shard, or (FULL_SHARD, resharding after
// forward) a gathered peak above the root plus the largest unit.
#include <torch/torch.h>

#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <functional>
#include <limits>
#include <fstream>
#include <iostream>
#include <sstream>

#include "fabric/fabric.h"
#include "fsdp_model.h"
#include "optim/state_bytes.h"
#include "precision/grad_scaler.h"
#include "precision/mixed_precision.h"
#include "strategies/auto_wrap.h"
#include "strategies/fsdp/fsdp.h"

namespace {

// A unit holding a given tensor, to tie one weight across two units.
struct TiedUnitImpl : torch::nn::Module {
  explicit TiedUnitImpl(torch::Tensor shared) : w(register_parameter("w", shared)) {}
  torch::Tensor forward(torch::Tensor x) { return x.matmul(w); }
  torch::Tensor w;
};
struct TiedNetImpl : torch::nn::Module {
  TiedNetImpl() {
    auto shared = torch::randn({4, 4});
    a = register_module("a", fabric::Sharded<TiedUnitImpl>(shared));
    b = register_module("b", fabric::Sharded<TiedUnitImpl>(shared));
  }
  torch::Tensor forward(torch::Tensor x) { return b(a(x)); }
  fabric::Sharded<TiedUnitImpl> a{nullptr}, b{nullptr};
};

// A unit whose forward modifies its (non-leaf) input in place.
struct InPlaceUnitImpl : torch::nn::Module {
  InPlaceUnitImpl() : fc(register_module("fc", torch::nn::Linear(4, 4))) {}
  torch::Tensor forward(torch::Tensor x) {
    x.mul_(0.5);
    return fc->forward(x);
  }
  torch::nn::Linear fc;
};
struct InPlaceNetImpl : torch::nn::Module {
  InPlaceNetImpl()
      : embed(register_module("embed", torch::nn::Linear(4, 4))),
        inner(register_module("inner", fabric::Sharded<InPlaceUnitImpl>(std::make_shared<InPlaceUnitImpl>()))) {}
  torch::Tensor forward(torch::Tensor x) { return inner(embed->forward(x)); }
  torch::nn::Linear embed;
  fabric::Sharded<InPlaceUnitImpl> inner;
};

bool error_contains(const std::function<void()>& action, const std::vector<std::string>& needles) {
  try {
    action();
  } catch (const std::exception& e) {
    const std::string what = e.what();
    for (const auto& needle : needles) {
      if (what.find(needle) == std::string::npos) {
        std::cerr << "message lacks \"" << needle << "\": " << what << std::endl;
        return false;
      }
    }
    return true;
  }
  std::cerr << "no error" << std::endl;
  return false;
}

// Counts the bytes alive in CPU tensors (the cross-check of the strategy's own
// accounting): each block carries its size in a 64-byte header.
class CountingAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    auto* base = static_cast<char*>(c10::alloc_cpu(n + kHeader));
    *reinterpret_cast<size_t*>(base) = n;
    add(static_cast<int64_t>(n));
    return {base + kHeader, base, &release, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }
  static int64_t live() { return live_.load(); }
  static int64_t peak() { return peak_.load(); }
  static void reset_peak() { peak_.store(live_.load()); }

 private:
  static constexpr size_t kHeader = 64;
  static void add(int64_t n) {
    const int64_t now = live_.fetch_add(n) + n;
    int64_t seen = peak_.load();
    while (now > seen && !peak_.compare_exchange_weak(seen, now)) {
    }
  }
  static void release(void* ctx) {
    auto* base = static_cast<char*>(ctx);
    add(-static_cast<int64_t>(*reinterpret_cast<size_t*>(base)));
    c10::free_cpu(base);
  }
  static inline std::atomic<int64_t> live_{0}, peak_{0};
};

void write_tensors(const std::vector<torch::Tensor>& tensors, const std::string& path) {
  c10::List<torch::Tensor> list;
  for (const auto& t : tensors) list.push_back(t.detach().cpu().to(torch::kFloat));
  auto bytes = torch::pickle_save(c10::IValue(list));
  std::ofstream(path, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

int fail(const std::string& what) {
  std::cerr << "fsdp check failed: " << what << std::endl;
  return 3;
}

// The FsdpAuxNet modes: 10 steps; writes OUTDIR/params_rank<r>.pt.
int run_aux_model(fabric::Fabric& fabric, const std::string& mode, const std::string& out) {
  const int64_t rank = fabric.global_rank(), per_rank = 16 / fabric.world_size();
  torch::manual_seed(0);
  auto model = std::make_shared<FsdpAuxNetImpl>();
  auto optimizer = std::make_shared<torch::optim::Adam>(model->parameters(), 1e-2);
  auto [net, opt] = fabric.setup(model, optimizer);
  for (int step = 0; step < 10; ++step) {
    auto [x, y] = fsdp_global_batch(step);
    auto xs = x.narrow(0, rank * per_rank, per_rank), ys = y.narrow(0, rank * per_rank, per_rank);
    opt.zero_grad();
    if (mode == "conditional") {
      auto o = net(xs);
      auto loss = torch::mse_loss(o.out, ys) + fsdp_side_term(o.side);
      if (rank == 1) loss = loss + fsdp_aux_term(o.aux);
      fabric.backward(loss);
    } else {
      const int64_t micro = per_rank / 2;
      for (int m = 0; m < 2; ++m) {
        auto o = net(xs.narrow(0, m * micro, micro));
        auto loss = torch::mse_loss(o.out, ys.narrow(0, m * micro, micro));
        if (m == 0) loss = loss + fsdp_side_term(o.side);
        fabric.backward(loss / 2);
      }
    }
    opt.step();
  }
  auto whole = fabric.strategy().full_state_context({model.get()}, {}, false);
  write_tensors(model->parameters(), out + "/params_rank" + std::to_string(rank) + ".pt");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  static CountingAllocator counting;
  c10::SetCPUAllocator(&counting, /*priority=*/100);
  if (argc < 3) {
    std::cerr << "usage: fsdp_worker MODE OUTDIR [flags]" << std::endl;
    return 2;
  }
  const std::string mode = argv[1], out = argv[2];
  fabric::FabricOptions options;
  options.accelerator = "cpu";
  options.strategy = "fsdp";
  std::string optimizer_name = "adam";
  bool sequential = false;
  int64_t width = 7;
  std::string from;
  std::vector<std::string> frozen;
  int64_t tag = 0;
  for (int i = 3; i < argc; ++i) {
    const std::string flag = argv[i];
    const std::string value = i + 1 < argc ? argv[i + 1] : "";
    if (flag == "--strategy") options.strategy = value, ++i;
    else if (flag == "--sharding") options.fsdp.sharding_strategy = value, ++i;
    else if (flag == "--optimizer") optimizer_name = value, ++i;
    else if (flag == "--precision") options.precision = value, ++i;
    else if (flag == "--width") width = std::stoi(value), ++i;
    else if (flag == "--state-dict") options.fsdp.state_dict_type = options.deepspeed.state_dict_type = value, ++i;
    else if (flag == "--from") from = value, ++i;
    else if (flag == "--accelerator") options.accelerator = value, ++i;
    else if (flag == "--devices") options.devices = fabric::Devices(value), ++i;
    else if (flag == "--reduce-dtype") options.fsdp.reduce_dtype = value, ++i;
    else if (flag == "--deepspeed-config") options.deepspeed.config = value, ++i;
    else if (flag == "--bucket-size") options.deepspeed.reduce_bucket_size = std::stoll(value), ++i;
    else if (flag == "--no-reshard") options.fsdp.reshard_after_forward = false;
    else if (flag == "--tag") tag = std::stoll(value), ++i;
    else if (flag == "--freeze") {
      std::stringstream list(value);
      for (std::string item; std::getline(list, item, ',');) frozen.push_back(item);
      ++i;
    }
    else if (flag == "--sequential") sequential = true;
    else if (flag == "--fp16-scaler")  // "16-mixed" semantics on the CPU (fp16 autocast + GradScaler)
      options.precision_plugin = std::make_shared<fabric::precision::MixedPrecision>(
          torch::kHalf, c10::DeviceType::CPU, std::make_unique<fabric::precision::GradScaler>());
    else if (flag == "--auto-wrap") options.fsdp.auto_wrap_policy = fabric::strategies::wrap_module_types({"FsdpBlock"});
    else return fail("unknown flag " + flag);
  }
  try {
    fabric::Fabric fabric(options);
    fabric.launch();
    const int64_t rank = fabric.global_rank(), world = fabric.world_size();
    if (mode == "errors") {
      auto tied = std::make_shared<TiedNetImpl>();
      if (!error_contains([&] { fabric.setup(tied); },
                          {"'a.w' and 'b.w'", "tied", "different sharding units", "'a' and 'b'"})) {
        return fail("a weight tied across units");
      }
      auto model = std::make_shared<FsdpNetImpl>();
      auto adam = std::make_shared<torch::optim::Adam>(model->parameters(), 1e-2);
      torch::mse_loss(model->forward(torch::randn({2, 5})), torch::zeros({2, 3})).backward();
      adam->step();
      if (!error_contains([&] { fabric.setup(model, adam); }, {"already has state", "fresh"})) {
        return fail("an optimizer with state at setup");
      }
      // A unit that modifies its input in place: refused, naming the unit.
      auto inplace = std::make_shared<InPlaceNetImpl>();
      auto [inplace_net, inplace_unused] =
          fabric.setup(inplace, std::make_shared<torch::optim::SGD>(inplace->parameters(), 0.1));
      if (!error_contains([&] { inplace_net(torch::randn({2, 4})); },
                          {"unit 'inner'", "in place", "x = x + f(x)"})) {
        return fail("a unit modifying its input in place");
      }
      fabric.print("fsdp errors ok");
      return 0;
    }
    if (mode == "ds_errors") {  // (under a deepspeed stage 1-2 strategy)
      torch::manual_seed(0);
      auto model = std::make_shared<FsdpNetImpl>();
      auto adam = std::make_shared<torch::optim::Adam>(model->parameters(), 1e-2);
      auto [net, opt] = fabric.setup(model, adam);
      auto [x, y] = fsdp_global_batch(0);
      torch::mse_loss(net(x), y).backward();  // not through fabric.backward
      if (!error_contains([&] { opt.step(); }, {"never received", "fabric.backward(loss)"})) {
        return fail("a step after a backward outside fabric.backward");
      }
      auto stepped = std::make_shared<FsdpNetImpl>();
      auto stepped_adam = std::make_shared<torch::optim::Adam>(stepped->parameters(), 1e-2);
      torch::mse_loss(stepped->forward(x), y).backward();
      stepped_adam->step();
      if (!error_contains([&] { fabric.setup(stepped, stepped_adam); }, {"already has state", "fresh"})) {
        return fail("an optimizer with state at setup");
      }
      auto other = std::make_shared<FsdpNetImpl>();
      auto orphan = std::make_shared<torch::optim::SGD>(other->parameters(), 0.1);
      if (!error_contains([&] { fabric.setup_optimizers(orphan); }, {"belongs to no module", "fabric.setup(model, optimizer)"})) {
        return fail("an optimizer over a module not set up");
      }
      fabric.print("deepspeed errors ok");
      return 0;
    }
    if (mode == "conditional" || mode == "accumulate_partial") return run_aux_model(fabric, mode, out);
    torch::manual_seed(0);
    auto model = std::make_shared<FsdpNetImpl>(sequential, width);
    fsdp_freeze(*model, frozen);
    auto optimizer = fsdp_optimizer(optimizer_name, model->parameters());
    auto [net, opt] = fabric.setup(model, optimizer);
    auto* fsdp = dynamic_cast<fabric::strategies::FSDPStrategy*>(&fabric.strategy());
    int64_t bound = 0;  // root + largest unit, in bytes
    if (fsdp) {
      const auto units = fsdp->units();
      if (units.size() != 4) return fail("expected the root and 3 units, got " + std::to_string(units.size()));
      int64_t largest = 0;
      for (size_t i = 1; i < units.size(); ++i) largest = std::max(largest, units[i].second);
      const auto padded = [world](int64_t n) { return (n + world - 1) / world * world; };
      bound = (padded(units[0].second) + padded(largest)) * 4;
    }
    const int64_t per_rank = 16 / world;
    std::vector<torch::Tensor> norms;
    int first_step = 0;
    if (mode == "resume" || mode == "reload") {
      fabric::State state{{"model", net}, {"optimizer", opt}, {"step", 0}};
      CountingAllocator::reset_peak();
      const int64_t before = CountingAllocator::live();
      fabric.load(from, state);
      first_step = static_cast<int>(state.at("step").to_int());
      if (mode == "reload") {
        std::ofstream(out + "/load_memory_rank" + std::to_string(rank) + ".txt")
            << CountingAllocator::peak() - before << "\n";
      }
    }
    if (mode == "reload") {
      {
        auto whole = fabric.strategy().full_state_context({model.get()}, {optimizer.get()}, false);
        if (rank == 0) {
          fabric::save_checkpoint(out + "/reloaded.pt",
                                  {{"model", model}, {"optimizer", optimizer}, {"step", first_step}});
        }
      }
      first_step = 10;
    }
    if (mode == "save_once") {
      auto [x, y] = fsdp_global_batch(0);
      opt.zero_grad();
      fabric.backward(torch::mse_loss(net(x.narrow(0, rank * per_rank, per_rank)),
                                      y.narrow(0, rank * per_rank, per_rank)));
      opt.step();
      fabric.save(out + "/ckpt", {{"model", net}, {"optimizer", opt}, {"step", tag}});
      return 0;
    }
    for (int step = first_step; step < 10; ++step) {
      if (mode == "mismatch" && step == 0 && rank == 1) {
        model->units[2](torch::randn({2, width}));
        return fail("rank 1 ran another unit than rank 0 without an error");
      }
      if (mode == "optimizer_only" && step == 5) {
        const std::string path = out + "/ckpt.pt";
        fabric.save(path, {{"model", net}, {"optimizer", opt}, {"step", step}});
        optimizer->state().clear();
        fabric::State state{{"optimizer", opt}};
        fabric.load(path, state);
        if (optimizer->state().empty()) return fail("loading only the optimizer restored no state");
      }
      if (mode == "save" && step == 5) {
        fabric.save(out + "/ckpt", {{"model", net}, {"optimizer", opt}, {"step", step}});
        if (options.fsdp.state_dict_type == "sharded") {  // the same state as one full file
          auto whole = fabric.strategy().full_state_context({model.get()}, {optimizer.get()}, false);
          if (rank == 0) {
            fabric::save_checkpoint(out + "/full.pt", {{"model", model}, {"optimizer", optimizer}, {"step", step}});
          }
        }
      }
      auto [x, y] = fsdp_global_batch(step);
      x = fabric.to_device(x);
      y = fabric.to_device(y);
      auto xs = x.narrow(0, rank * per_rank, per_rank), ys = y.narrow(0, rank * per_rank, per_rank);
      if (fsdp) fsdp->reset_peak_gathered_bytes();
      CountingAllocator::reset_peak();
      opt.zero_grad();
      if (mode == "accumulate") {
        const int64_t micro = per_rank / 2;
        for (int m = 0; m < 2; ++m) {
          auto guard = fabric.no_backward_sync(net, /*enabled=*/m == 0);
          fabric.backward(torch::mse_loss(net(xs.narrow(0, m * micro, micro)),
                                          ys.narrow(0, m * micro, micro)) / 2);
        }
      } else {
        fabric.backward(torch::mse_loss(net(xs), ys));
      }
      std::vector<torch::Tensor> before;
      if (mode == "inf" && step >= 3 && step <= 4) {
        auto whole = fabric.strategy().full_state_context({model.get()}, {}, false);
        for (const auto& p : model->parameters()) before.push_back(p.detach().clone());
      }
      if (mode == "inf" && step == 3 && rank == 1) {
        torch::NoGradGuard no_grad;
        // The gradients the optimizer steps: the module's (fsdp: its pieces) or,
        // under deepspeed stages 1-2, this rank's pieces of them.
        for (auto& p : fabric::strategies::optimizer_parameters(*optimizer)) {
          if (p.grad().defined() && p.grad().numel() > 0) {
            p.grad().view({-1})[0] = std::numeric_limits<float>::infinity();
            break;
          }
        }
      }
      if (mode == "clip") {
        norms.push_back(torch::tensor(*fabric.clip_gradients(net, opt, {.max_norm = 0.05})));
      }
      opt.step();
      if (mode == "inf" && step >= 3 && step <= 4) {
        auto* scaler = fabric.precision().scaler();
        if (!scaler) return fail("--fp16-scaler is needed for mode inf");
        const double skipped = scaler->last_step_skipped() ? 1 : 0;
        if (fabric.all_reduce(skipped, "min") != fabric.all_reduce(skipped, "max")) {
          return fail("step " + std::to_string(step) + " was skipped on some ranks only");
        }
        if (fabric.all_reduce(scaler->get_scale(), "min") != fabric.all_reduce(scaler->get_scale(), "max")) {
          return fail("the loss scales differ between ranks");
        }
        bool unchanged = true;
        {
          auto whole = fabric.strategy().full_state_context({model.get()}, {}, false);
          auto params = model->parameters();
          for (size_t i = 0; i < params.size(); ++i) unchanged = unchanged && torch::equal(params[i], before[i]);
        }
        if (step == 3 && (!unchanged || skipped != 1)) return fail("the step with an inf was not skipped");
        if (step == 4 && (unchanged || skipped != 0)) return fail("the step after the inf did not train");
      }
      {  // a forward without gradients between steps (evaluation) changes nothing
        torch::NoGradGuard no_grad;
        net(xs);
      }
      if (fsdp) {
        if (fsdp->gathered_bytes() != 0) {
          return fail("step " + std::to_string(step) + ": " + std::to_string(fsdp->gathered_bytes()) +
                      " gathered bytes alive between steps");
        }
        const bool freed_after_forward = options.fsdp.sharding_strategy == "FULL_SHARD" &&
                                         options.fsdp.reshard_after_forward && mode != "accumulate" &&
                                         mode != "inf";  // inf gathers everything to compare
        if (freed_after_forward && fsdp->peak_gathered_bytes() > bound) {
          return fail("gathered peak " + std::to_string(fsdp->peak_gathered_bytes()) +
                      " bytes is above root + largest unit (" + std::to_string(bound) + ")");
        }
      }
    }
    if (fsdp && options.fsdp.sharding_strategy != "NO_SHARD") {
      int64_t at_rest = 0, full = 0;
      for (const auto& p : model->parameters()) at_rest += p.numel();
      {
        auto whole = fabric.strategy().full_state_context({model.get()}, {}, false);
        for (const auto& p : model->parameters()) full += p.numel();
      }
      if (at_rest * world > full + 4 * world) {
        return fail("parameters at rest hold " + std::to_string(at_rest) + " of " + std::to_string(full) +
                    " elements");
      }
    }
    if (mode == "memory") {
      std::ofstream(out + "/memory_rank" + std::to_string(rank) + ".txt")
          << fabric::optim::state_bytes(*optimizer) << " " << CountingAllocator::live() << " "
          << CountingAllocator::peak() << "\n";
    }
    if (mode == "clip") write_tensors(norms, out + "/norms_rank" + std::to_string(rank) + ".pt");
    {
      auto whole = fabric.strategy().full_state_context({model.get()}, {}, false);
      write_tensors(model->parameters(), out + "/params_rank" + std::to_string(rank) + ".pt");
    }
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << std::endl;
    return 1;
  }
}
