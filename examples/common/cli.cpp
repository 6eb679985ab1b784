#include "cli.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <memory>
#include <exception>
#include <iostream>
#include <sys/stat.h>
#include <tuple>

#include <boost/program_options.hpp>

#include "checkpoint/filesystem.h"
#include "fabric/fabric.h"
#include "loggers/csv_logger.h"
#include "loggers/tensorboard_logger.h"
#include "strategies/deepspeed/config.h"
#include "strategies/registry.h"

namespace examples {

void parse_flags(const boost::program_options::options_description& flags, int argc, char** argv,
                 boost::program_options::variables_map& vm) {
  namespace po = boost::program_options;
  try {
    po::store(po::parse_command_line(argc, argv, flags), vm);
    po::notify(vm);
  } catch (const po::error& e) {
    std::cerr << "error: " << e.what() << "\n\n" << flags << std::endl;
    std::exit(2);
  }
  if (vm.count("help")) {
    std::cout << flags << std::endl;
    std::exit(0);
  }
}

int run_main(int (*run)(int, char**), int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << std::endl;
    return 1;
  }
}

TrainArgs parse_args(int argc, char** argv, const std::string& description, TrainArgs args,
                     const std::vector<ExtraFlag>& extra) {
  namespace po = boost::program_options;
  std::string devices = args.fabric.devices.str();
  std::string precision = args.fabric.precision.str();
  std::string progress = "auto";
  int64_t collective_timeout = args.fabric.collective_timeout.count();
  std::string default_loggers;
  for (const auto& name : args.loggers) default_loggers += (default_loggers.empty() ? "" : " ") + name;
  po::options_description flags(description + "\n\nOptions");
  flags.add_options()
      ("help,h", "show this help and exit")
      ("accelerator", po::value(&args.fabric.accelerator)->default_value(args.fabric.accelerator),
       "auto, cpu, cuda or gpu")
      ("devices", po::value(&devices)->default_value(devices),
       "number of devices (processes on cpu), a list such as 0,1, or auto")
      ("strategy", po::value(&args.fabric.strategy)->default_value(args.fabric.strategy),
       fabric::strategies::strategy_choices().c_str())
      ("sharding-strategy",
       po::value(&args.fabric.fsdp.sharding_strategy)->default_value(args.fabric.fsdp.sharding_strategy),
       "with --strategy fsdp: FULL_SHARD, SHARD_GRAD_OP or NO_SHARD")
      ("state-dict-type",
       po::value(&args.fabric.fsdp.state_dict_type)->default_value(args.fabric.fsdp.state_dict_type),
       "with --strategy fsdp or deepspeed*: what checkpoints hold, full (one file) or sharded "
       "(a directory, one file per rank)")
      ("deepspeed-config",
       po::value(&args.fabric.deepspeed.config)->default_value(args.fabric.deepspeed.config),
       "with --strategy deepspeed*: a DeepSpeed JSON config (ds_config.json): ZeRO stage, offload, "
       "bucket sizes, gradient_clipping, fp16 loss scaling; its train_micro_batch_size_per_gpu is "
       "the batch size unless --batch-size is given")
      ("tensor-parallel-size",
       po::value(&args.fabric.model_parallel.tensor_parallel_size)
           ->default_value(args.fabric.model_parallel.tensor_parallel_size),
       "with --strategy model_parallel: ranks each layer is split across (0: auto, the devices "
       "per node)")
      ("data-parallel-size",
       po::value(&args.fabric.model_parallel.data_parallel_size)
           ->default_value(args.fabric.model_parallel.data_parallel_size),
       "with --strategy model_parallel: ranks that see different data (0: auto, the rest of the "
       "world)")
      ("data-parallel",
       po::value(&args.fabric.model_parallel.data_parallel)
           ->default_value(args.fabric.model_parallel.data_parallel),
       "with --strategy model_parallel: what the data-parallel dimension runs, fsdp or ddp")
      ("num-nodes", po::value(&args.fabric.num_nodes)->default_value(args.fabric.num_nodes),
       "number of nodes")
      ("precision", po::value(&precision)->default_value(precision),
       "32-true, 64-true, 16-mixed, bf16-mixed, 16-true, bf16-true (or 32, 64, 16, bf16)")
      ("epochs", po::value(&args.epochs)->default_value(args.epochs), "passes over the training set")
      ("batch-size", po::value(&args.batch_size)->default_value(args.batch_size), "batch size per device")
      ("max-steps", po::value(&args.max_steps)->default_value(args.max_steps),
       "stop after this many optimizer steps (-1: no limit)")
      ("seed", po::value(&args.seed)->default_value(args.seed), "global random seed")
      ("lr", po::value(&args.lr)->default_value(args.lr), "learning rate")
      ("checkpoint", po::value(&args.checkpoint)->default_value(args.checkpoint),
       "where to write the final checkpoint (empty: do not write)")
      ("resume", po::value(&args.resume)->default_value(args.resume),
       "continue training from this checkpoint (model, optimizer, step, epoch, RNG); auto: from the "
       "newest checkpoint beside --checkpoint, if any")
      ("max-restarts", po::value(&args.fabric.max_restarts)->default_value(args.fabric.max_restarts),
       "when Fabric starts the ranks: start the job again when a rank dies, up to this many times "
       "(with --resume auto it continues from the newest checkpoint)")
      ("collective-timeout", po::value(&collective_timeout)->default_value(collective_timeout),
       "stall detection: seconds a collective may wait for the other ranks before the job ends, "
       "naming the ranks not in it (0: wait forever)")
      ("logger", po::value(&args.loggers)->multitoken()->composing()->default_value(args.loggers, default_loggers),
       "csv, tensorboard (both allowed, e.g. --logger csv tensorboard) or none")
      ("log-dir", po::value(&args.log_dir)->default_value(args.log_dir),
       "loggers write to LOG_DIR/<example>/version_N (Lightning's layout)")
      ("log-every", po::value(&args.log_every)->default_value(args.log_every),
       "steps between training-loss entries in the logs")
      ("progress", po::value(&progress)->default_value(progress),
       "progress bar on stderr: auto (when stderr is a terminal), on or off");
  for (const auto& flag : extra) {
    if (flag.integer) {
      flags.add_options()(flag.name.c_str(), po::value(flag.integer)->default_value(*flag.integer),
                          flag.help.c_str());
    } else if (flag.on) {
      flags.add_options()(flag.name.c_str(), po::bool_switch(flag.on), flag.help.c_str());
    } else if (flag.text) {
      flags.add_options()(flag.name.c_str(), po::value(flag.text)->default_value(*flag.text),
                          flag.help.c_str());
    }
  }
  po::variables_map vm;
  parse_flags(flags, argc, argv, vm);
  // The shared flags' minimums (nothing below them means anything).
  auto reject = [&](const std::string& message) {
    std::cerr << "error: " << message << std::endl;
    std::exit(2);
  };
  if (args.epochs < 1) reject("--epochs must be at least 1, got " + std::to_string(args.epochs));
  if (args.batch_size < 1) {
    reject("--batch-size must be at least 1, got " + std::to_string(args.batch_size));
  }
  if (args.max_steps < -1 || args.max_steps == 0) {
    reject("--max-steps must be -1 (no limit) or at least 1, got " + std::to_string(args.max_steps));
  }
  if (!(args.lr > 0)) reject("--lr must be positive, got " + std::to_string(args.lr));
  if (args.fabric.max_restarts < 0) {
    reject("--max-restarts must be 0 (no restarts) or more, got " + std::to_string(args.fabric.max_restarts));
  }
  if (collective_timeout < 0) {
    reject("--collective-timeout must be 0 (off) or more seconds, got " + std::to_string(collective_timeout));
  }
  args.fabric.collective_timeout = std::chrono::seconds(collective_timeout);
  if (args.log_every < 1) reject("--log-every must be at least 1, got " + std::to_string(args.log_every));
  try {
    args.progress = fabric::parse_progress_mode(progress);
  } catch (const std::exception& e) {
    reject(std::string("--") + e.what());
  }
  // --logger takes several names, space- or comma-separated.
  std::vector<std::string> loggers;
  for (const auto& entry : args.loggers) {
    size_t start = 0;
    while (start <= entry.size()) {
      const size_t comma = std::min(entry.find(',', start), entry.size());
      if (comma > start) loggers.push_back(entry.substr(start, comma - start));
      start = comma + 1;
    }
  }
  // Both loggers share one version_N directory: the next free one, read (not
  // created) here; only rank zero's loggers ever write.
  int64_t version = -1;
  if (!loggers.empty() && loggers.front() != "none") {
    fabric::logging::version_directory(args.log_dir, args.run_name, -1, &version);
  }
  for (const auto& name : loggers) {
    if (name == "csv") {
      args.fabric.loggers.push_back(
          std::make_shared<fabric::CSVLogger>(args.log_dir, args.run_name, version));
    } else if (name == "tensorboard") {
      args.fabric.loggers.push_back(
          std::make_shared<fabric::TensorBoardLogger>(args.log_dir, args.run_name, version));
    } else if (name != "none") {
      reject("--logger must be csv, tensorboard or none, got '" + name + "'");
    }
  }
  if (loggers.size() > 1 && std::find(loggers.begin(), loggers.end(), "none") != loggers.end()) {
    reject("--logger none cannot be combined with other loggers");
  }
  args.loggers = loggers;
  for (const auto& flag : extra) {
    if (flag.integer && *flag.integer < flag.min) {
      std::cerr << "error: --" << flag.name << " must be at least " << flag.min << ", got "
                << *flag.integer << std::endl;
      std::exit(2);
    }
  }
  args.fabric.deepspeed.state_dict_type = args.fabric.fsdp.state_dict_type;
  args.fabric.model_parallel.state_dict_type = args.fabric.fsdp.state_dict_type;
  for (const char* flag : {"tensor-parallel-size", "data-parallel-size", "data-parallel"}) {
    if (!vm[flag].defaulted() && args.fabric.strategy != "model_parallel") {
      reject(std::string("--") + flag + " needs --strategy model_parallel, got --strategy " +
             args.fabric.strategy);
    }
  }
  if (!args.fabric.deepspeed.config.empty()) {
    if (args.fabric.strategy.rfind("deepspeed", 0) != 0) {
      reject("--deepspeed-config needs --strategy deepspeed (or deepspeed_stage_N...), got --strategy " +
             args.fabric.strategy);
    }
    // The config's micro-batch size, as DeepSpeed's own scripts take it (the
    // strategy reads the rest of the file, and reports its errors, at launch).
    fabric::strategies::DeepSpeedOptions read;
    try {
      fabric::strategies::apply_deepspeed_config(args.fabric.deepspeed.config, 0, read);
    } catch (const std::exception& e) {
      reject(e.what());
    }
    if (read.train_micro_batch_size_per_gpu > 0) {
      if (vm["batch-size"].defaulted()) {
        args.batch_size = read.train_micro_batch_size_per_gpu;
      } else if (args.batch_size != read.train_micro_batch_size_per_gpu) {
        reject("--batch-size " + std::to_string(args.batch_size) + " disagrees with the deepspeed config's "
               "train_micro_batch_size_per_gpu = " + std::to_string(read.train_micro_batch_size_per_gpu) +
               "; give one of them");
      }
    }
  }
  args.fabric.devices = fabric::Devices(devices);
  args.fabric.precision = precision;
  return args;
}

std::string resume_path(fabric::Fabric& fabric, const TrainArgs& args) {
  if (args.resume != "auto") return args.resume;
  if (args.checkpoint.empty()) {
    throw std::invalid_argument("--resume auto looks for checkpoints beside --checkpoint, which is empty");
  }
  std::string chosen;
  if (fabric.is_global_zero()) {
    const auto slash = args.checkpoint.rfind('/');
    const std::string folder = slash == std::string::npos ? "." : args.checkpoint.substr(0, slash);
    std::string stem = slash == std::string::npos ? args.checkpoint : args.checkpoint.substr(slash + 1);
    if (const auto dot = stem.rfind('.'); dot != std::string::npos && dot > 0) stem = stem.substr(0, dot);
    // Newest by (seconds, nanoseconds, path): ties go to the later name.
    std::tuple<int64_t, int64_t, std::string> newest{-1, -1, ""};
    if (fabric::fs::is_directory(folder)) {
      for (const auto& name : fabric::fs::list_directory(folder)) {
        // Not the temporaries of atomic writes (NAME.tmp.PID, a sharded
        // directory's NAME.partial and NAME.old): only complete checkpoints.
        if (!name.starts_with(stem) || name.find(".tmp.") != std::string::npos || name.ends_with(".partial") ||
            name.ends_with(".old")) {
          continue;
        }
        const std::string path = fabric::fs::join(folder, name);
        struct stat info {};
        if (::stat(path.c_str(), &info) != 0) continue;
        newest = std::max(newest, {info.st_mtim.tv_sec, info.st_mtim.tv_nsec, path});
      }
    }
    chosen = std::get<2>(newest);
  }
  return fabric.broadcast(chosen, 0);
}

}  // namespace examples
