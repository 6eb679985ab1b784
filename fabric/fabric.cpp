#include "fabric/fabric.h"
#include "checkpoint/sharded_checkpoint.h"

#include <cstdlib>
#include <cstring>
#include <exception>
#include <iostream>
#include <stdexcept>
#include <thread>
#include <unistd.h>

#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <torch/serialize.h>

#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>
#include <torch/utils.h>

#include "accelerators/cpu_memory.h"
#include "launchers/mpirun.h"
#include "launchers/rank_watch.h"
#include "launchers/local_ranks.h"
#include "launchers/restarts.h"
#include "precision/registry.h"
#include "strategies/registry.h"
#include "util/quoted_list.h"

namespace fabric {

Fabric::Fabric(FabricOptions options) : options_(std::move(options)) {
  Connection connection = connect(options_);
  accelerator_name_ = connection.accelerator->name();
  needs_launch_ = connection.needs_launch;
  node_launch_ = connection.node_launch;
  supervises_restarts_ = connection.supervises_restarts;
  strategies::StrategyArgs args;
  args.topology = connection.topology;
  args.process_group_backend = options_.process_group_backend;
  args.main_address = connection.environment.main_address;
  args.main_port = connection.environment.main_port;
  args.timeout = options_.timeout;
  args.collective_timeout = options_.collective_timeout;
  args.ddp = options_.ddp;
  args.fsdp = options_.fsdp;
  args.deepspeed = options_.deepspeed;
  args.model_parallel = options_.model_parallel;
  strategy_ = options_.strategy_plugin ? options_.strategy_plugin
                                       : strategies::make_strategy(connection.strategy, args);
  // The strategy owns the precision plugin (Lightning's strategy.precision).
  strategy_->set_precision(options_.precision_plugin
                               ? options_.precision_plugin
                               : precision::make_precision(connection.precision,
                                                           connection.accelerator->device_type()));
  if (options_.retain_cpu_memory) accelerators::retain_freed_cpu_memory();
}

Fabric::~Fabric() {
  for (auto& logger : options_.loggers) {
    try {
      logger->finalize();
    } catch (...) {
      // A destructor must not throw; the logger already flushed what it could.
    }
  }
  // Rank 0 of a job it spawned waits for the other ranks (a failing one ends the
  // job with its status from the watcher thread).
  local_ranks_.reset();
}

void Fabric::launch() {
  if (launched_) {
    throw std::logic_error("Fabric::launch() was already called on this Fabric");
  }
  if (const char* watch = std::getenv(launchers::kWatchRankVariable); watch && std::string(watch) == "1") {
    // A rank of a restarted mpirun job: this process becomes the rank's watcher
    // and runs the program again as its child, which trains (launchers/rank_watch.h).
    ::unsetenv(launchers::kWatchRankVariable);
    launchers::watch_rank(launchers::own_command_line());
  }
  if (supervises_restarts_) {
    // This process only supervises: each attempt starts every rank, rank 0
    // included, as a child, so that any rank can die and be started again.
    const auto command = launchers::own_command_line();
    const int n = static_cast<int>(world_size());
    const bool mpi = device().is_cpu() && n > 1;  // CPU ranks form one MPI world
    // mpirun's ranks run below a watcher that names the one that fails.
    if (mpi) ::setenv(launchers::kWatchRankVariable, "1", 1);
    const int status = launchers::run_with_restarts(options_.max_restarts, "torchfabric", [&] {
      return mpi ? launchers::run_mpirun_attempt(launchers::mpirun_command(n, command))
                 : launchers::run_local_attempt(n, command);
    });
    std::cout.flush();
    std::exit(status);
  }
  if (options_.max_restarts > 0 && !std::getenv("FABRIC_RESTART_COUNT") && is_global_zero()) {
    std::cerr << "torchfabric: max_restarts=" << options_.max_restarts
              << " is not applied: this job's ranks were started by a launcher, which decides about "
                 "restarts (fabric-run --max-restarts N, torchrun --max-restarts N)"
              << std::endl;
  }
  if (needs_launch_) {
    if (device().is_cpu()) {
      // CPU ranks must form one MPI world: restart this program under mpirun.
      launchers::relaunch_under_mpirun(static_cast<int>(world_size()));
    }
    // Other devices (CUDA/NCCL): this process is rank 0 and starts the others.
    const int local = static_cast<int>(world_size()) / node_launch_.num_nodes;
    launchers::LocalRanks::Node node{node_launch_.num_nodes, node_launch_.node_rank,
                                     node_launch_.main_address, node_launch_.main_port};
    local_ranks_ = std::make_unique<launchers::LocalRanks>(local, std::vector<std::string>{},
                                                           launchers::LocalRanks::FailureHandler{},
                                                           std::move(node));
  }
  strategy_->setup_environment();
  launched_ = true;
}

void Fabric::check_module(const torch::nn::Module* module) const {
  if (!module) throw std::invalid_argument("Fabric::setup: the module is a null pointer");
}

void Fabric::place_module(torch::nn::Module& module) {
  strategy_->precision().convert_module(module);
  strategy_->setup_module(module);
}

FabricOptimizer Fabric::setup_optimizer(std::shared_ptr<torch::optim::Optimizer> optimizer) {
  if (!optimizer) throw std::invalid_argument("Fabric::setup: the optimizer is a null pointer");
  strategy_->setup_optimizer(*optimizer);
  return FabricOptimizer(std::move(optimizer), strategy_);
}

void Fabric::backward(const at::Tensor& loss) {
  if (!loss.defined()) throw std::invalid_argument("Fabric::backward: the loss is undefined");
  strategy_->backward(loss);
}

std::optional<double> Fabric::clip_gradients(torch::nn::Module* module,
                                             FabricOptimizer& optimizer,
                                             const ClipGradientsOptions& options) {
  if (options.max_norm.has_value() == options.clip_val.has_value()) {
    throw std::invalid_argument(
        "Fabric::clip_gradients: set exactly one of max_norm and clip_val (got " +
        std::string(options.max_norm ? "both" : "neither") + ")");
  }
  if (options.max_norm) {
    return strategy_->clip_gradients_norm(module, *optimizer.optimizer(), *options.max_norm,
                                          options.norm_type,
                                          options.error_if_nonfinite);
  }
  strategy_->clip_gradients_value(module, *optimizer.optimizer(), *options.clip_val);
  return std::nullopt;
}

precision::ScopePtr Fabric::autocast() const { return strategy_->precision().forward_context(); }

at::Tensor Fabric::to_device(const at::Tensor& tensor) const { return tensor.to(device()); }

torch::data::Example<> Fabric::to_device(const torch::data::Example<>& batch) const {
  return {to_device(batch.data), to_device(batch.target)};
}

std::vector<at::Tensor> Fabric::to_device(const std::vector<at::Tensor>& tensors) const {
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (const auto& t : tensors) out.push_back(to_device(t));
  return out;
}

uint64_t Fabric::seed_everything(std::optional<uint64_t> seed) {
  if (!seed) {
    const char* env = std::getenv("PL_GLOBAL_SEED");
    seed = 0;
    if (env && *env) {
      try {
        seed = std::stoull(env);
      } catch (const std::exception&) {
        throw std::invalid_argument(std::string("PL_GLOBAL_SEED='") + env +
                                    "' is not a non-negative integer");
      }
    }
  }
  torch::manual_seed(*seed);
  std::srand(static_cast<unsigned>(*seed));
  ::setenv("PL_GLOBAL_SEED", std::to_string(*seed).c_str(), 1);
  seed_ = seed;
  return *seed;
}

namespace {

// The modules and optimizers anywhere in `state`, for the strategy's state scope.
void collect_stateful(const State& state, std::vector<torch::nn::Module*>& modules,
                      std::vector<torch::optim::Optimizer*>& optimizers) {
  for (const auto& [key, value] : state) {
    switch (value.kind()) {
      case StateValue::Kind::kModule: modules.push_back(value.module().get()); break;
      case StateValue::Kind::kOptimizer: optimizers.push_back(value.optimizer().get()); break;
      case StateValue::Kind::kNested: collect_stateful(value.nested(), modules, optimizers); break;
      default: break;
    }
  }
}

// Where a parameter the strategy shards lies in the whole (sharded checkpoints).
std::function<std::optional<ShardedJob::Shard>(const at::Tensor&)> shard_answers(
    const strategies::Strategy& strategy) {
  return [&strategy](const at::Tensor& param) -> std::optional<ShardedJob::Shard> {
    auto shard = strategy.parameter_shard(param);
    if (!shard) return std::nullopt;
    return ShardedJob::Shard{std::move(shard->full_shape), shard->flat_offset, std::move(shard->ranges),
                             shard->owner};
  };
}

// The module parameter an optimizer's stand-in (ZeRO's pieces) belongs to.
std::function<at::Tensor(const at::Tensor&)> stand_in_answers(const strategies::Strategy& strategy) {
  return [&strategy](const at::Tensor& t) { return strategy.parameter_of(t); };
}

}  // namespace

void Fabric::save(const std::string& path, const State& state) {
  std::vector<torch::nn::Module*> modules;
  std::vector<torch::optim::Optimizer*> optimizers;
  collect_stateful(state, modules, optimizers);
  if (strategy_->sharded_checkpoints()) {  // what each rank holds, one file per rank
    ShardedJob job;
    job.rank = strategy_->global_rank();
    job.world_size = strategy_->world_size();
    job.shard_of = shard_answers(*strategy_);
    job.stands_for = stand_in_answers(*strategy_);
    job.any_rank_failed = [this](bool failed_here) {
      return strategy_->all_reduce_value(failed_here ? 1.0 : 0.0, strategies::Strategy::ReduceOp::kMax) != 0;
    };
    auto scope = strategy_->sharded_state_context(modules, optimizers, /*loading=*/false);
    save_sharded_checkpoint(path, state, job);
    return;
  }
  auto scope = strategy_->full_state_context(modules, optimizers, /*loading=*/false);
  strategy_->save_checkpoint(path, [&](const std::string& p) { save_checkpoint(p, state); });
}

LoadResult Fabric::load(const std::string& path, State& state, bool strict) {
  std::vector<torch::nn::Module*> modules;
  std::vector<torch::optim::Optimizer*> optimizers;
  collect_stateful(state, modules, optimizers);
  if (is_distributed_checkpoint(path)) {
    // Each rank reads just its pieces of what it holds sharded, into place: no
    // rank gathers or builds the full state (at any world size: the chunks
    // that overlap a piece are read, whoever wrote them).
    auto scope = strategy_->sharded_state_context(modules, optimizers, /*loading=*/true);
    if (auto pieces = read_sharded_pieces(path, state, shard_answers(*strategy_), stand_in_answers(*strategy_))) {
      return load_checkpoint_value(*pieces, state, strict, path);
    }
  }
  auto scope = strategy_->full_state_context(modules, optimizers, /*loading=*/true);
  return load_checkpoint(path, state, strict);
}

void Fabric::load_raw(const std::string& path, torch::nn::Module& module, bool strict) {
  auto scope = strategy_->full_state_context({&module}, {}, /*loading=*/true);
  fabric::load_raw(path, module, strict);
}

void Fabric::load_raw(const std::string& path, FabricOptimizer& optimizer) {
  auto scope = strategy_->full_state_context({}, {optimizer.optimizer().get()}, /*loading=*/true);
  fabric::load_raw(path, *optimizer.optimizer());
}

void Fabric::log(const std::string& name, double value, int64_t step) {
  log_dict({{name, value}}, step);
}

void Fabric::log_dict(const std::map<std::string, double>& metrics, int64_t step) {
  if (step < 0) step = next_log_step_;
  next_log_step_ = step + 1;
  if (!is_global_zero()) return;
  for (auto& logger : options_.loggers) logger->log_metrics(metrics, step);
}

void Fabric::log_hyperparams(const HyperParameters& params) {
  if (!is_global_zero()) return;
  for (auto& logger : options_.loggers) logger->log_hyperparams(params);
}

void Fabric::call(const std::string& hook) {
  for (auto& callback : options_.callbacks) callback->on(hook, *this);
}

void Fabric::barrier() { strategy_->barrier(); }

namespace {

strategies::Strategy::ReduceOp parse_op(const std::string& op) {
  using Op = strategies::Strategy::ReduceOp;
  if (op == "sum") return Op::kSum;
  if (op == "mean") return Op::kMean;
  if (op == "max") return Op::kMax;
  if (op == "min") return Op::kMin;
  throw std::invalid_argument("all_reduce: " +
                              unsupported_value("reduce_op", op, {"sum", "mean", "max", "min"}));
}

}  // namespace

at::Tensor Fabric::all_reduce(at::Tensor tensor, const std::string& op) {
  const auto reduce = parse_op(op);
  if (world_size() == 1) return tensor;
  at::Tensor work = tensor.to(device());
  strategy_->all_reduce(work, reduce);
  if (!work.is_same(tensor)) tensor.copy_(work);
  return tensor;
}

double Fabric::all_reduce(double value, const std::string& op) {
  return strategy_->all_reduce_value(value, parse_op(op));
}

at::Tensor Fabric::all_gather(const at::Tensor& tensor) {
  if (world_size() == 1) return tensor.unsqueeze(0);
  return strategy_->all_gather(tensor.to(device()));
}

at::Tensor Fabric::broadcast(at::Tensor tensor, int64_t src) {
  if (world_size() == 1) return tensor;
  at::Tensor work = tensor.to(device());
  strategy_->broadcast(work, src);
  if (!work.is_same(tensor)) tensor.copy_(work);
  return tensor;
}

std::string Fabric::broadcast(const std::string& value, int64_t src) {
  if (world_size() == 1) return value;
  auto size = at::full({1}, static_cast<int64_t>(value.size()), at::kLong);
  size = broadcast(size, src);
  auto bytes = at::empty({size.item<int64_t>()}, at::kByte);
  if (global_rank() == src) std::memcpy(bytes.data_ptr(), value.data(), value.size());
  bytes = broadcast(bytes, src);
  return std::string(static_cast<const char*>(bytes.data_ptr()),
                     static_cast<size_t>(bytes.numel()));
}

c10::IValue Fabric::broadcast(const c10::IValue& value, int64_t src) {
  if (world_size() == 1) return value;
  std::string payload;
  if (global_rank() == src) {
    auto data = torch::pickle_save(value);
    payload.assign(data.begin(), data.end());
  }
  payload = broadcast(payload, src);
  return torch::pickle_load(std::vector<char>(payload.begin(), payload.end()));
}

Fabric::NoBackwardSync::NoBackwardSync(strategies::Strategy& strategy, bool enabled)
    : strategy_(strategy), previous_(strategy.gradient_sync()) {
  if (enabled) strategy_.set_gradient_sync(false);
}

Fabric::NoBackwardSync::~NoBackwardSync() { strategy_.set_gradient_sync(previous_); }

Fabric::RankZeroFirst::RankZeroFirst(Fabric& fabric) : fabric_(fabric) {
  if (!fabric_.is_global_zero()) fabric_.barrier();
}

Fabric::RankZeroFirst::~RankZeroFirst() noexcept(false) {
  if (fabric_.is_global_zero() && !std::uncaught_exceptions()) fabric_.barrier();
}

int64_t Fabric::global_rank() const { return strategy_->global_rank(); }
int64_t Fabric::local_rank() const { return strategy_->local_rank(); }
int64_t Fabric::node_rank() const { return strategy_->node_rank(); }
int64_t Fabric::world_size() const { return strategy_->world_size(); }
c10::Device Fabric::device() const { return strategy_->root_device(); }

}  // namespace fabric
