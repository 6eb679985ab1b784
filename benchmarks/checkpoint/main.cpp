// Checkpoint save/load time for a model of about 100 M parameters (float32, 25
// tensors of 4 M): torchfabric's atomic save_checkpoint / load_checkpoint against
// Python's torch.save / torch.load of tensors of the same shapes on the same disk,
// measured in the same run (best of --repeats). Then the memory a load into a
// model of that size needs beyond the model itself, sampled from
// /proc/self/status while it runs: with the file mapped (what load_checkpoint
// does) and read into memory first (ReadMode::kCopy, as before). Last line:
// `save time torchfabric/python: X`.
#include <torch/torch.h>

#include <malloc.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <functional>
#include <iomanip>
#include <iostream>
#include <regex>

#include <boost/program_options.hpp>

#include "cli.h"
#include "benchmarks/common/memory.h"
#include "benchmarks/common/run_command.h"

#include "checkpoint/checkpoint.h"
#include "checkpoint/filesystem.h"
#include "checkpoint/state_dict.h"

namespace {
using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

struct WideImpl : torch::nn::Module {
  WideImpl(int tensors, int64_t numel) {
    for (int i = 0; i < tensors; ++i) {
      register_parameter("layer" + std::to_string(i), torch::randn({numel}));
    }
  }
};

}  // namespace

int main(int argc, char** argv) {
  // Large blocks straight from and back to the OS, so a freed buffer does not
  // linger in the heap and hide the next measurement's growth.
  mallopt(M_MMAP_THRESHOLD, 1 << 20);
  namespace po = boost::program_options;
  int tensors = 25, repeats = 3;
  int64_t numel = 4 * 1024 * 1024;
  std::string dir = "build/bench-checkpoint", python = "python3";
  po::options_description flags("checkpoint save/load: torchfabric vs Python torch.save/torch.load");
  flags.add_options()("help,h", "show this help")
      ("tensors", po::value(&tensors)->default_value(tensors), "number of tensors")
      ("numel", po::value(&numel)->default_value(numel), "elements per tensor")
      ("repeats", po::value(&repeats)->default_value(repeats), "best of this many")
      ("dir", po::value(&dir)->default_value(dir), "where to write the files")
      ("python", po::value(&python)->default_value(python), "python3 with torch");
  po::variables_map vm;
  examples::parse_flags(flags, argc, argv, vm);
  fabric::fs::make_directories(dir);
  const std::string path = dir + "/torchfabric.pt";
  fabric::State model;
  for (int i = 0; i < tensors; ++i) model.emplace("layer" + std::to_string(i) + ".weight", torch::randn({numel}));
  fabric::State state{{"model", fabric::State(model)}, {"step", 1}};
  double save = 1e9, load = 1e9;
  for (int r = 0; r < repeats; ++r) {
    auto start = Clock::now();
    fabric::save_checkpoint(path, state);
    save = std::min(save, seconds_since(start));
    fabric::State target{{"model", fabric::State()}, {"step", 0}};
    start = Clock::now();
    auto result = fabric::load_checkpoint(path, target);
    load = std::min(load, seconds_since(start));
  }
  // Memory of a load into a model, beyond the model (whose parameters exist
  // before the load starts). The file is read once first so both variants find
  // it in the page cache.
  double mapped_anon = 0, mapped_rss = 0, copy_anon = 0, copy_rss = 0, model_bytes = 0;
  {
    auto wide = std::make_shared<WideImpl>(tensors, numel);
    for (const auto& p : wide->parameters()) model_bytes += static_cast<double>(p.nbytes());
    const std::string model_path = dir + "/model.pt";
    fabric::save_checkpoint(model_path, {{"model", wide}});
    {
      std::ifstream warm(model_path, std::ios::binary);
      std::vector<char> chunk(1 << 20);
      while (warm.read(chunk.data(), static_cast<std::streamsize>(chunk.size()))) {
      }
    }
    std::tie(mapped_anon, mapped_rss) = benchmarks::peak_growth([&] {
      fabric::State into{{"model", wide}};
      fabric::load_checkpoint(model_path, into);
    });
    std::tie(copy_anon, copy_rss) = benchmarks::peak_growth([&] {
      const auto loaded = fabric::read_checkpoint(model_path, fabric::ReadMode::kCopy);
      fabric::load_module_state_dict(*wide, loaded.toGenericDict().at("model"));
    });
  }
  const std::string script = dir + "/python_bench.py";
  std::FILE* f = std::fopen(script.c_str(), "w");
  std::fprintf(f,
               "import os, time, torch, sys\n"
               "n, numel, repeats, path = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]\n"
               "state = {'model': {f'layer{i}.weight': torch.randn(numel) for i in range(n)}, 'step': 1}\n"
               "save = load = durable = 1e9\n"
               "for _ in range(repeats):\n"
               "    t = time.perf_counter(); torch.save(state, path); save = min(save, time.perf_counter() - t)\n"
               "    t = time.perf_counter(); torch.load(path); load = min(load, time.perf_counter() - t)\n"
               "    t = time.perf_counter()\n"
               "    with open(path, 'wb') as f:\n"
               "        torch.save(state, f); f.flush(); os.fsync(f.fileno())\n"
               "    durable = min(durable, time.perf_counter() - t)\n"
               "print(f'python save {save:.4f} load {load:.4f} fsynced {durable:.4f}')\n");
  std::fclose(f);
  const std::string cmd = python + " " + script + " " + std::to_string(tensors) + " " +
                          std::to_string(numel) + " " + std::to_string(repeats) + " " + dir +
                          "/python.pt";
  const auto output = benchmarks::run_command(cmd).output;
  std::smatch m;
  if (!std::regex_search(output, m, std::regex("python save ([0-9.]+) load ([0-9.]+) fsynced ([0-9.]+)"))) {
    std::cerr << "python benchmark failed:\n" << output << std::endl;
    return 1;
  }
  const double py_save = std::stod(m[1]), py_load = std::stod(m[2]), py_durable = std::stod(m[3]);
  const double params = static_cast<double>(tensors) * static_cast<double>(numel);
  std::cout << std::fixed << std::setprecision(3) << params / 1e6 << " M parameters, best of "
            << repeats << "\n"
            << "torchfabric save " << save << " s, load " << load << " s\n"
            << "python      save " << py_save << " s (with fsync " << py_durable << " s), load "
            << py_load << " s\n"
            << "save time torchfabric/python-with-fsync: " << save / py_durable << "\n"
            << "load time torchfabric/python: " << load / py_load << "\n"
            << "memory a load needs beyond the model, per byte of model (peak, sampled):\n"
            << "  file mapped (load_checkpoint): anonymous " << mapped_anon / model_bytes
            << ", resident incl. page-cache pages " << mapped_rss / model_bytes << "\n"
            << "  file read into memory first:   anonymous " << copy_anon / model_bytes
            << ", resident " << copy_rss / model_bytes << "\n"
            << "load extra anonymous memory / model bytes: " << mapped_anon / model_bytes << "\n"
            << "save time torchfabric/python: " << save / py_save << std::endl;
  fabric::fs::remove_all(dir);
  return 0;
}
