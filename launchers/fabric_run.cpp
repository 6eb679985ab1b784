// fabric-run: starts this node's ranks of a torchfabric program, like Lightning's
// `fabric run`. The flags become LT_* variables that Fabric reads (with
// LT_CLI_USED=1, so a conflicting value in code is an error).
//
//   fabric-run --devices 2 -- ./train --epochs 3          # 2 CPU ranks via mpirun
//   fabric-run --accelerator cuda --devices 8 -- ./train  # 8 GPU ranks, NCCL
//   fabric-run --accelerator cuda --devices 8 --num-nodes 2 --node-rank 0
//              --main-address node0 -- ./train        # on each node
//
// CPU ranks are started through mpirun (their collectives run on Open MPI, which
// only joins processes it started); GPU ranks are started directly with
// torchrun-style variables and supervised: when one fails, the rest are stopped
// and fabric-run exits with its status. With --max-restarts N the job is started
// again instead, up to N times (launchers/restarts.h); the program resumes from
// its newest checkpoint.
//   fabric-run --devices 2 --max-restarts 3 -- ./train --checkpoint-dir ckpts
#include <cstdlib>
#include <iostream>
#include <map>
#include <string>
#include <vector>

#include <boost/program_options.hpp>

#include "accelerators/accelerator.h"
#include "launchers/mpirun.h"
#include "launchers/rank_watch.h"
#include "launchers/restarts.h"
#include "launchers/supervisor.h"
#include "strategies/registry.h"

namespace po = boost::program_options;

int main(int argc, char** argv) {
  // Internal: how fabric-run --max-restarts starts each rank under mpirun, below a
  // watcher that names the rank when it fails (launchers/rank_watch.h).
  if (argc >= 2 && std::string(argv[1]) == "--watch-rank") {
    std::vector<std::string> program(argv + 2, argv + argc);
    if (!program.empty() && program.front() == "--") program.erase(program.begin());
    try {
      fabric::launchers::watch_rank(program);
    } catch (const std::exception& e) {
      std::cerr << "fabric-run --watch-rank: " << e.what() << std::endl;
      return 2;
    }
  }
  std::string accelerator = "auto", strategy = "auto", devices = "1", precision = "32-true";
  std::string main_address = "127.0.0.1", launcher = "auto", hosts;
  int num_nodes = 1, node_rank = 0, main_port = 29400, max_restarts = 0;
  std::vector<std::string> program;
  po::options_description flags(
      "fabric-run: start the ranks of a torchfabric program on this node\n\n"
      "usage: fabric-run [options] [--] PROGRAM [ARGS...]\n\nOptions");
  flags.add_options()
      ("help,h", "show this help and exit")
      ("accelerator", po::value(&accelerator)->default_value(accelerator),
       "auto (cuda if a GPU is visible, else cpu), cpu, cuda or gpu")
      ("strategy", po::value(&strategy)->default_value(strategy),
       (fabric::strategies::strategy_choices() +
        "; or a name the program registers (passed to the program as LT_STRATEGY when given)").c_str())
      ("devices", po::value(&devices)->default_value(devices),
       "ranks on this node: a number of CPU processes or GPUs, a GPU list such as 0,1, or auto")
      ("num-nodes", po::value(&num_nodes)->default_value(num_nodes), "number of nodes in the job")
      ("node-rank", po::value(&node_rank)->default_value(node_rank),
       "this node's index, 0 .. num-nodes-1")
      ("main-address", po::value(&main_address)->default_value(main_address),
       "address of node 0, where rank 0 hosts the rendezvous store")
      ("main-port", po::value(&main_port)->default_value(main_port), "port of the rendezvous store")
      ("precision", po::value(&precision)->default_value(precision),
       "32-true, 64-true, 16-mixed, bf16-mixed, 16-true, bf16-true (passed as LT_PRECISION when given)")
      ("launcher", po::value(&launcher)->default_value(launcher),
       "auto (mpirun for cpu, subprocess for cuda), mpirun, or subprocess")
      ("hosts", po::value(&hosts),
       "one job across nodes through mpirun, as HOST:N,HOST:N (N ranks on each; the same N "
       "everywhere); fabric-run and the program must be at the same paths on every host. Instead "
       "of --devices, --num-nodes and --node-rank")
      ("max-restarts", po::value(&max_restarts)->default_value(max_restarts),
       "when a rank dies, end every rank and start the job again, up to this many times "
       "(FABRIC_RESTART_COUNT tells the program which attempt it is; it resumes from its newest "
       "checkpoint); across nodes with --hosts")
      ("program", po::value(&program), "the program and its arguments");
  po::positional_options_description positional;
  positional.add("program", -1);
  po::variables_map vm;
  try {
    po::store(po::command_line_parser(argc, argv).options(flags).positional(positional).run(), vm);
    po::notify(vm);
  } catch (const po::error& e) {
    std::cerr << "fabric-run: " << e.what() << "\n\n" << flags << std::endl;
    return 2;
  }
  if (vm.count("help")) {
    std::cout << flags << std::endl;
    return 0;
  }
  if (program.empty()) {
    std::cerr << "fabric-run: no program given\n\n" << flags << std::endl;
    return 2;
  }
  try {
    if (num_nodes < 1 || node_rank < 0 || node_rank >= num_nodes) {
      throw std::invalid_argument("--node-rank " + std::to_string(node_rank) +
                                  " is out of range for --num-nodes " + std::to_string(num_nodes));
    }
    if (max_restarts < 0) {
      throw std::invalid_argument("--max-restarts " + std::to_string(max_restarts) +
                                  " is not supported; valid: 0 (no restarts) or more");
    }
    if (max_restarts > 0 && num_nodes > 1) {
      throw std::invalid_argument(
          "--max-restarts with --num-nodes " + std::to_string(num_nodes) +
          " is not supported: one node's fabric-run cannot end the other nodes' ranks, which would "
          "wait in their next collective. Start the whole job from one fabric-run with --hosts "
          "HOST:N,HOST:N (through mpirun, which ends and restarts the ranks on every host)");
    }
    if (main_port < 1 || main_port > 65535) {
      throw std::invalid_argument("--main-port " + std::to_string(main_port) +
                                  " is not a TCP port (1..65535)");
    }
    if (vm.count("hosts")) {
      for (const char* flag : {"devices", "num-nodes", "node-rank"}) {
        if (!vm[flag].defaulted()) {
          throw std::invalid_argument(std::string("--") + flag +
                                      " with --hosts: --hosts already says the ranks on each host and "
                                      "the number of nodes; leave out --" + flag);
        }
      }
      if (launcher == "subprocess") {
        throw std::invalid_argument("--hosts starts the ranks through mpirun; it cannot be used with "
                                    "--launcher subprocess");
      }
      const auto job = fabric::launchers::parse_hosts(hosts);
      std::map<std::string, std::string> environment = {
          {"LT_DEVICES", std::to_string(job.ranks_per_host)},
          {"LT_NUM_NODES", std::to_string(job.hosts)},
          {"LT_CLI_USED", "1"}};
      if (!vm["accelerator"].defaulted()) environment["LT_ACCELERATOR"] = accelerator;
      if (!vm["strategy"].defaulted()) environment["LT_STRATEGY"] = strategy;
      if (!vm["precision"].defaulted()) environment["LT_PRECISION"] = precision;
      // mpirun passes its environment only to the ranks of its own host: the
      // others get these with -x.
      std::vector<std::string> mpirun_flags = {"-H", hosts};
      for (const auto& [key, value] : environment) {
        ::setenv(key.c_str(), value.c_str(), 1);
        mpirun_flags.insert(mpirun_flags.end(), {"-x", key});
      }
      const int ranks = job.hosts * job.ranks_per_host;
      if (max_restarts == 0) {
        fabric::launchers::exec_command(fabric::launchers::mpirun_command(ranks, program, mpirun_flags));
      }
      for (const char* key : {"FABRIC_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS"}) {
        mpirun_flags.insert(mpirun_flags.end(), {"-x", key});
      }
      std::vector<std::string> watched = {fabric::launchers::own_command_line().front(), "--watch-rank", "--"};
      watched.insert(watched.end(), program.begin(), program.end());
      const auto command = fabric::launchers::mpirun_command(ranks, watched, mpirun_flags);
      return fabric::launchers::run_with_restarts(max_restarts, "fabric-run", [&] {
        return fabric::launchers::run_mpirun_attempt(command);
      });
    }
    auto acc = fabric::make_accelerator(accelerator);
    const int local = static_cast<int>(acc->parse_devices(fabric::Devices(devices)).size());
    if (launcher == "auto") launcher = acc->name() == "cpu" ? "mpirun" : "subprocess";
    if (launcher != "mpirun" && launcher != "subprocess") {
      throw std::invalid_argument("--launcher " + launcher +
                                  " is not supported; valid: auto, mpirun, subprocess");
    }
    // As Lightning's `fabric run`: devices and num_nodes always, accelerator,
    // strategy and precision only when given, so the program's own choice in
    // code stands unless the command line names another one.
    std::map<std::string, std::string> common = {
        {"LT_DEVICES", devices}, {"LT_NUM_NODES", std::to_string(num_nodes)}, {"LT_CLI_USED", "1"}};
    if (!vm["accelerator"].defaulted()) common["LT_ACCELERATOR"] = accelerator;
    if (!vm["strategy"].defaulted()) common["LT_STRATEGY"] = strategy;
    if (!vm["precision"].defaulted()) common["LT_PRECISION"] = precision;
    for (const auto& [key, value] : common) ::setenv(key.c_str(), value.c_str(), 1);

    if (launcher == "mpirun") {
      if (num_nodes > 1) {
        throw std::invalid_argument(
            "--num-nodes " + std::to_string(num_nodes) +
            " with CPU ranks: the CPU backend is Open MPI, which cannot join ranks started by "
            "separate fabric-run commands (and Gloo is not in this LibTorch). Start one job "
            "across the nodes instead: fabric-run --hosts host1:n,host2:n -- PROGRAM (or mpirun -np N "
            "-H host1:n,host2:n PROGRAM)");
      }
      if (max_restarts == 0) fabric::launchers::exec_command(fabric::launchers::mpirun_command(local, program));
      // Each rank below this fabric-run as its watcher, so that each restart names the rank.
      std::vector<std::string> watched = {fabric::launchers::own_command_line().front(), "--watch-rank", "--"};
      watched.insert(watched.end(), program.begin(), program.end());
      const auto command = fabric::launchers::mpirun_command(local, watched);
      return fabric::launchers::run_with_restarts(max_restarts, "fabric-run", [&] {
        return fabric::launchers::run_mpirun_attempt(command);
      });
    }
    const int world = local * num_nodes;
    auto start_ranks = [&](fabric::launchers::Supervisor& supervisor) {
      for (int r = 0; r < local; ++r) {
        supervisor.start(node_rank * local + r, program,
                         fabric::launchers::torchrun_environment(node_rank * local + r, r, world,
                                                                 local, node_rank, main_address,
                                                                 main_port));
      }
    };
    if (max_restarts == 0) {
      fabric::launchers::Supervisor supervisor;
      supervisor.forward_signals();
      start_ranks(supervisor);
      return supervisor.wait_all();
    }
    return fabric::launchers::run_with_restarts(max_restarts, "fabric-run", [&] {
      return fabric::launchers::run_supervised_attempt(start_ranks);
    });
  } catch (const std::exception& e) {
    std::cerr << "fabric-run: " << e.what() << std::endl;
    return 2;
  }
}
