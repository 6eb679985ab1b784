// Sharded checkpoints at 2 CPU ranks: fabric.save / fabric.load of an fsdp
// model's torch.distributed.checkpoint directory against Python's dcp.save /
// dcp.load (+ set_state_dict) of PyTorch FSDP2 (fully_shard over gloo) holding
// parameters of the same shapes, with Adam state, in the same run. Then the
// memory a sharded load takes per rank (peak growth of anonymous memory,
// sampled) against the size of that rank's shard. Last lines:
//   sharded save time torchfabric/python: X
//   sharded load time torchfabric/python: X
//   sharded load peak memory / shard bytes: X
//   sharded_checkpoint                 runs the comparison
//   sharded_checkpoint --worker ...    one rank of the torchfabric side (under mpirun)
#include <torch/torch.h>

#include <malloc.h>

#include <chrono>
#include <fstream>
#include <functional>
#include <iomanip>
#include <iostream>
#include <regex>

#include <boost/program_options.hpp>

#include "benchmarks/common/memory.h"
#include "benchmarks/common/run_command.h"
#include "checkpoint/filesystem.h"
#include "cli.h"
#include "fabric/fabric.h"

namespace {

using Clock = std::chrono::steady_clock;

struct WideImpl : torch::nn::Module {
  WideImpl(int tensors, int64_t rows, int64_t cols) {
    for (int i = 0; i < tensors; ++i) register_parameter("w" + std::to_string(i), torch::randn({rows, cols}));
  }
  torch::Tensor forward(torch::Tensor x) {
    torch::Tensor y = x;
    for (const auto& p : parameters()) y = y + p.sum() * 0;
    return y;
  }
};

int worker(int tensors, int64_t rows, int64_t cols, int repeats, const std::string& dir) {
  fabric::FabricOptions options;
  options.strategy = "fsdp";
  options.fsdp.state_dict_type = "sharded";
  fabric::Fabric fabric(options);
  fabric.launch();
  torch::set_num_threads(1);
  torch::manual_seed(0);
  auto module = std::make_shared<WideImpl>(tensors, rows, cols);
  auto adam = std::make_shared<torch::optim::Adam>(module->parameters(), 1e-3);
  auto [model, opt] = fabric.setup(module, adam);
  opt.zero_grad();
  fabric.backward(model(torch::ones({1})).sum());
  opt.step();  // Adam state exists
  double shard_bytes = 0;  // parameters at rest are this rank's pieces; Adam keeps two more
  for (const auto& p : module->parameters()) shard_bytes += 3.0 * static_cast<double>(p.nbytes());
  const std::string path = dir + "/torchfabric";
  double save = 1e9, load = 1e9, memory = 0;
  for (int r = 0; r < repeats; ++r) {
    fabric.barrier();
    auto start = Clock::now();
    fabric.save(path, {{"model", model}, {"optimizer", opt}, {"step", r}});
    fabric.barrier();
    save = std::min(save, std::chrono::duration<double>(Clock::now() - start).count());
    fabric::State state{{"model", model}, {"optimizer", opt}, {"step", 0}};
    fabric.barrier();
    start = Clock::now();
    const double grown = benchmarks::peak_growth([&] { fabric.load(path, state); }).first;
    fabric.barrier();
    load = std::min(load, std::chrono::duration<double>(Clock::now() - start).count());
    memory = std::max(memory, grown);
  }
  const double worst_memory = fabric.all_reduce(memory / shard_bytes, "max");
  if (fabric.is_global_zero()) {
    std::cout << "torchfabric save " << save << " load " << load << " memory " << worst_memory << std::endl;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  mallopt(M_MMAP_THRESHOLD, 1 << 20);  // freed buffers go back to the OS at once
  namespace po = boost::program_options;
  int tensors = 12, repeats = 3;
  int64_t rows = 1024, cols = 2048;
  std::string dir = "build/bench-sharded-checkpoint", python = "python3";
  po::options_description flags("sharded checkpoints at 2 ranks: torchfabric vs PyTorch DCP with FSDP2");
  flags.add_options()("help,h", "show this help")
      ("tensors", po::value(&tensors)->default_value(tensors), "number of parameters")
      ("rows", po::value(&rows)->default_value(rows), "rows of each")
      ("cols", po::value(&cols)->default_value(cols), "columns of each")
      ("repeats", po::value(&repeats)->default_value(repeats), "best of this many")
      ("dir", po::value(&dir)->default_value(dir), "where to write the checkpoints")
      ("python", po::value(&python)->default_value(python), "python3 with torch")
      ("worker", "one rank of the torchfabric side (internal)");
  po::variables_map vm;
  examples::parse_flags(flags, argc, argv, vm);
  if (vm.count("worker")) return worker(tensors, rows, cols, repeats, dir);
  fabric::fs::remove_all(dir);
  fabric::fs::make_directories(dir);
  const std::string shape = " --tensors " + std::to_string(tensors) + " --rows " + std::to_string(rows) +
                            " --cols " + std::to_string(cols) + " --repeats " + std::to_string(repeats) +
                            " --dir " + dir;
  const std::string root = ::geteuid() == 0 ? " --allow-run-as-root" : "";
  const auto ours = benchmarks::run_command("mpirun -np 2 --bind-to none --oversubscribe" + root + " " +
                                            argv[0] + " --worker" + shape);
  std::smatch m;
  if (!std::regex_search(ours.output, m, std::regex("torchfabric save ([0-9.e-]+) load ([0-9.e-]+) memory ([0-9.e-]+)"))) {
    std::cerr << "torchfabric side failed:\n" << ours.output << std::endl;
    return 1;
  }
  const double save = std::stod(m[1]), load = std::stod(m[2]), memory = std::stod(m[3]);
  const std::string script = dir + "/python_bench.py";
  std::ofstream(script)
      << "import os, sys, time, threading, torch, torch.distributed as dist\n"
         "import torch.distributed.checkpoint as dcp\n"
         "from torch.distributed.fsdp import fully_shard\n"
         "from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict\n"
         "n, rows, cols, repeats, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]\n"
         "def anon():\n"
         "    for line in open('/proc/self/status'):\n"
         "        if line.startswith('RssAnon:'): return int(line.split()[1]) * 1024\n"
         "class Wide(torch.nn.Module):\n"
         "    def __init__(self):\n"
         "        super().__init__()\n"
         "        self.p = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(rows, cols)) for _ in range(n)])\n"
         "    def forward(self, x):\n"
         "        return sum(x + p.sum() * 0 for p in self.p)\n"
         "def main(rank):\n"
         "    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT='29561')\n"
         "    torch.set_num_threads(1)\n"
         "    dist.init_process_group('gloo', rank=rank, world_size=2)\n"
         "    torch.manual_seed(0)\n"
         "    m = Wide(); fully_shard(m)\n"
         "    opt = torch.optim.Adam(m.parameters(), lr=1e-3)\n"
         "    m(torch.ones(1)).sum().backward(); opt.step()\n"
         "    shard = sum(3 * p.to_local().numel() * 4 for p in m.parameters())\n"
         "    save = load = 1e9; memory = 0\n"
         "    for r in range(repeats):\n"
         "        path = f'{out}/python{r}'\n"
         "        dist.barrier(); t = time.perf_counter()\n"
         "        msd, osd = get_state_dict(m, opt)\n"
         "        dcp.save({'model': msd, 'optimizer': osd}, checkpoint_id=path)\n"
         "        dist.barrier(); save = min(save, time.perf_counter() - t)\n"
         "        dist.barrier(); t = time.perf_counter()\n"
         "        start = anon(); peak = [start]; done = [False]\n"
         "        def sample():\n"
         "            while not done[0]: peak[0] = max(peak[0], anon()); time.sleep(0.0002)\n"
         "        th = threading.Thread(target=sample); th.start()\n"
         "        msd, osd = get_state_dict(m, opt)\n"
         "        state = {'model': msd, 'optimizer': osd}\n"
         "        dcp.load(state, checkpoint_id=path)\n"
         "        set_state_dict(m, opt, model_state_dict=state['model'], optim_state_dict=state['optimizer'])\n"
         "        done[0] = True; th.join()\n"
         "        dist.barrier(); load = min(load, time.perf_counter() - t)\n"
         "        memory = max(memory, (max(peak[0], anon()) - start) / shard)\n"
         "    worst = torch.tensor(memory); dist.all_reduce(worst, op=dist.ReduceOp.MAX)\n"
         "    if rank == 0: print(f'python save {save:.4f} load {load:.4f} memory {worst.item():.4f}')\n"
         "    dist.destroy_process_group()\n"
         "if __name__ == '__main__':\n"
         "    import torch.multiprocessing as mp\n"
         "    mp.spawn(main, nprocs=2)\n";
  const auto py = benchmarks::run_command(python + " " + script + " " + std::to_string(tensors) + " " +
                                          std::to_string(rows) + " " + std::to_string(cols) + " " +
                                          std::to_string(repeats) + " " + dir);
  if (!std::regex_search(py.output, m, std::regex("python save ([0-9.]+) load ([0-9.]+) memory ([0-9.]+)"))) {
    std::cerr << "python side failed:\n" << py.output << std::endl;
    return 1;
  }
  const double py_save = std::stod(m[1]), py_load = std::stod(m[2]), py_memory = std::stod(m[3]);
  const double params = static_cast<double>(tensors) * static_cast<double>(rows * cols);
  std::cout << std::fixed << std::setprecision(3) << params / 1e6
            << " M parameters + Adam state at 2 ranks, best of " << repeats << "\n"
            << "torchfabric save " << save << " s, load " << load << " s, load peak memory " << memory
            << " x the rank's shard\n"
            << "python dcp  save " << py_save << " s, load " << py_load << " s, load peak memory " << py_memory
            << " x the rank's shard\n"
            << "sharded save time torchfabric/python: " << save / py_save << "\n"
            << "sharded load time torchfabric/python: " << load / py_load << "\n"
            << "sharded load peak memory / shard bytes: " << memory << std::endl;
  fabric::fs::remove_all(dir);
  return 0;
}
