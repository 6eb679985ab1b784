#include "cli.h"

#include <cstdlib>
#include <exception>
#include <iostream>

#include <boost/program_options.hpp>

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
  po::options_description flags(description + "\n\nOptions");
  flags.add_options()
      ("help,h", "show this help and exit")
      ("accelerator", po::value(&args.fabric.accelerator)->default_value(args.fabric.accelerator),
       "auto, cpu, cuda or gpu")
      ("devices", po::value(&devices)->default_value(devices),
       "number of devices (processes on cpu), a list such as 0,1, or auto")
      ("strategy", po::value(&args.fabric.strategy)->default_value(args.fabric.strategy),
       "auto, single_device, ddp or fsdp")
      ("sharding-strategy",
       po::value(&args.fabric.fsdp.sharding_strategy)->default_value(args.fabric.fsdp.sharding_strategy),
       "with --strategy fsdp: FULL_SHARD, SHARD_GRAD_OP or NO_SHARD")
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
       "continue training from this checkpoint (model, optimizer, step, epoch, RNG)");
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
  for (const auto& flag : extra) {
    if (flag.integer && *flag.integer < flag.min) {
      std::cerr << "error: --" << flag.name << " must be at least " << flag.min << ", got "
                << *flag.integer << std::endl;
      std::exit(2);
    }
  }
  args.fabric.devices = fabric::Devices(devices);
  args.fabric.precision = precision;
  return args;
}

}  // namespace examples
