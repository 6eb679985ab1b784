// Sharded checkpoints as torch.distributed.checkpoint (DCP) directories: the
// chunking of flat pieces, the .metadata pickle both ways with Python, a save
// by several ranks (threads here, each holding FSDP-style flat pieces) read
// back whole and at other world sizes, Python's and Lightning's readers on
// ours, ours on what Python's FSDP2 and Lightning write, and damaged
// directories named in the error.
#include <condition_variable>
#include <mutex>

#include "checkpoint/dcp.h"
#include "checkpoint/sharded_checkpoint.h"
#include "checkpoint_test_util.h"

using namespace checkpoint_test;

namespace {

// Every simulated rank's any_rank_failed: a barrier that ORs the answers.
class Rendezvous {
 public:
  explicit Rendezvous(int ranks) : ranks_(ranks) {}
  bool arrive(bool failed) {
    std::unique_lock<std::mutex> lock(mutex_);
    const int generation = generation_;
    any_ = any_ || failed;
    if (++arrived_ == ranks_) {
      result_ = any_;
      any_ = false;
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
      return result_;
    }
    cv_.wait(lock, [&] { return generation_ != generation; });
    return result_;
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  int ranks_, arrived_ = 0, generation_ = 0;
  bool any_ = false, result_ = false;
};

// Rank r's piece of every parameter (FSDP-style: flat, ceil(n / world) each).
std::pair<int64_t, int64_t> piece_of(int64_t numel, int rank, int world) {
  const int64_t per = (numel + world - 1) / world;
  const int64_t lo = std::min(numel, per * rank);
  return {lo, std::min(numel, lo + per)};
}

struct RankState {
  std::shared_ptr<torch::nn::Module> model;
  std::shared_ptr<torch::optim::Adam> adam;
  std::map<const void*, fabric::ShardedJob::Shard> shards;
};

// What an fsdp rank holds of `full` (an Mlp after some Adam steps).
RankState rank_state(MlpImpl& full, torch::optim::Adam& full_adam, int rank, int world) {
  RankState out;
  out.model = std::make_shared<torch::nn::Module>();
  std::vector<torch::Tensor> params;
  for (const auto& child : full.named_children()) {
    auto piece_module = std::make_shared<torch::nn::Module>();
    for (const auto& p : child.value()->named_parameters(/*recurse=*/false)) {
      const auto [lo, hi] = piece_of(p.value().numel(), rank, world);
      auto piece = piece_module->register_parameter(
          p.key(), p.value().detach().reshape({-1}).narrow(0, lo, hi - lo).clone());
      out.shards[piece.unsafeGetTensorImpl()] = {p.value().sizes().vec(), lo};
      params.push_back(piece);
    }
    out.model->register_module(child.key(), piece_module);
  }
  out.adam = std::make_shared<torch::optim::Adam>(params, torch::optim::AdamOptions(0.01));
  auto full_params = full.parameters();
  for (size_t i = 0; i < params.size(); ++i) {
    auto& st = static_cast<torch::optim::AdamParamState&>(
        *full_adam.state().at(full_params[i].unsafeGetTensorImpl()));
    const auto [lo, hi] = piece_of(full_params[i].numel(), rank, world);
    auto mine = std::make_unique<torch::optim::AdamParamState>();
    mine->step(st.step());
    mine->exp_avg(st.exp_avg().reshape({-1}).narrow(0, lo, hi - lo).clone());
    mine->exp_avg_sq(st.exp_avg_sq().reshape({-1}).narrow(0, lo, hi - lo).clone());
    out.adam->state()[params[i].unsafeGetTensorImpl()] = std::move(mine);
  }
  return out;
}

// `world` threads save their pieces of (full, adam) into `dir` as fsdp ranks would.
void save_as_ranks(const std::string& dir, MlpImpl& full, torch::optim::Adam& adam, int world,
                   int64_t step) {
  std::vector<RankState> ranks;
  for (int r = 0; r < world; ++r) ranks.push_back(rank_state(full, adam, r, world));
  Rendezvous rendezvous(world);
  std::vector<std::exception_ptr> errors(world);
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      fabric::ShardedJob job;
      job.rank = r;
      job.world_size = world;
      job.shard_of = [&, r](const at::Tensor& t) -> std::optional<fabric::ShardedJob::Shard> {
        auto it = ranks[r].shards.find(t.unsafeGetTensorImpl());
        if (it == ranks[r].shards.end()) return std::nullopt;
        return it->second;
      };
      job.any_rank_failed = [&](bool failed) { return rendezvous.arrive(failed); };
      try {
        fabric::save_sharded_checkpoint(
            dir, {{"model", ranks[r].model}, {"optimizer", ranks[r].adam}, {"step", step}}, job);
      } catch (...) {
        errors[r] = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (auto& e : errors) {
    if (e) std::rethrow_exception(e);
  }
}

// An Mlp and its Adam after three steps on random data.
std::pair<std::shared_ptr<MlpImpl>, std::shared_ptr<torch::optim::Adam>> trained(uint64_t seed) {
  torch::manual_seed(seed);
  auto model = std::make_shared<MlpImpl>();
  auto adam = std::make_shared<torch::optim::Adam>(model->parameters(), torch::optim::AdamOptions(0.01));
  for (int i = 0; i < 3; ++i) {
    adam->zero_grad();
    model->forward(torch::randn({6, 5})).pow(2).sum().backward();
    adam->step();
  }
  return {model, adam};
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "(no error)";
}

}  // namespace

TEST(Dcp, ChunksOfAFlatRangeTileItInOrder) {
  for (const std::vector<int64_t>& shape :
       std::vector<std::vector<int64_t>>{{7, 5}, {3, 4, 5}, {10}, {2, 3, 2, 3}, {1, 9}}) {
    int64_t numel = 1;
    for (auto d : shape) numel *= d;
    const auto full = torch::arange(numel).view(shape);
    for (int64_t begin = 0; begin <= numel; ++begin) {
      for (int64_t end = begin; end <= numel; ++end) {
        const auto chunks = fabric::dcp::chunks_of_range(shape, begin, end);
        EXPECT_LE(chunks.size(), 2 * shape.size() - 1);
        int64_t at = begin;
        for (const auto& c : chunks) {
          auto region = full;
          for (size_t d = 0; d < shape.size(); ++d) region = region.narrow(d, c.offsets[d], c.sizes[d]);
          ASSERT_TRUE(torch::equal(region.reshape({-1}), torch::arange(at, at + c.numel())))
              << "shape " << shape << " range [" << begin << ", " << end << ")";
          at += c.numel();
        }
        ASSERT_EQ(at, end) << "shape " << shape << " range [" << begin << ", " << end << ")";
      }
    }
  }
  EXPECT_EQ(fabric::dcp::chunks_of_range({}, 0, 1).size(), 1u);  // a scalar: one empty chunk
}

TEST(Dcp, MetadataWeWriteIsPythonsOwnClassesAndReadsBack) {
  fabric::dcp::Metadata m;
  auto& w = m.entries["model.fc.weight"];
  w.dtype = torch::kBFloat16;
  w.size = {3, 4};
  w.chunks = {{{0, 0}, {1, 4}}, {{1, 0}, {2, 4}}};
  w.storage = {{"__0_0.distcp", 0, 100}, {"__1_0.distcp", 64, 3000000000LL}};
  auto& lr = m.entries["optimizer.param_groups.0.lr"];
  lr.tensor = false;
  lr.storage = {{"__0_0.distcp", 128, 50}};
  m.planner_data["model.fc.weight"] = {std::string("model"), std::string("fc.weight")};
  m.planner_data["optimizer.param_groups.0.lr"] = {std::string("optimizer"), std::string("param_groups"),
                                                   int64_t{0}, std::string("lr")};
  const auto bytes = fabric::dcp::write_metadata(m);
  const std::string path = dir() + "/written.metadata";
  std::ofstream(path, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));

  const auto back = fabric::dcp::read_metadata(bytes.data(), bytes.size(), path);
  ASSERT_EQ(back.entries.size(), 2u);
  const auto& bw = back.entries.at("model.fc.weight");
  EXPECT_EQ(bw.dtype, torch::kBFloat16);
  EXPECT_EQ(bw.size, (std::vector<int64_t>{3, 4}));
  ASSERT_EQ(bw.chunks.size(), 2u);
  EXPECT_EQ(bw.chunks[1].offsets, (std::vector<int64_t>{1, 0}));
  EXPECT_EQ(bw.storage[1].relative_path, "__1_0.distcp");
  EXPECT_EQ(bw.storage[1].length, 3000000000LL);
  EXPECT_FALSE(back.entries.at("optimizer.param_groups.0.lr").tensor);
  EXPECT_EQ(back.planner_data.at("optimizer.param_groups.0.lr")[2].toInt(), 0);

  const auto out = run_python("dcp_metadata",
      "import pickle, torch\n"
      "from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata, BytesStorageMetadata, MetadataIndex\n"
      "m = pickle.load(open('" + path + "', 'rb'))\n"
      "assert isinstance(m, Metadata), type(m)\n"
      "w = m.state_dict_metadata['model.fc.weight']\n"
      "assert isinstance(w, TensorStorageMetadata) and w.size == torch.Size([3, 4]), w\n"
      "assert w.properties.dtype == torch.bfloat16 and w.properties.memory_format == torch.contiguous_format\n"
      "assert [tuple(c.offsets) for c in w.chunks] == [(0, 0), (1, 0)], w.chunks\n"
      "assert isinstance(m.state_dict_metadata['optimizer.param_groups.0.lr'], BytesStorageMetadata)\n"
      "info = m.storage_data[MetadataIndex('model.fc.weight', torch.Size([1, 0]))]\n"
      "assert info.relative_path == '__1_0.distcp' and info.offset == 64 and info.length == 3000000000, info\n"
      "assert m.storage_data[MetadataIndex('optimizer.param_groups.0.lr')].offset == 128\n"
      "assert m.planner_data['optimizer.param_groups.0.lr'] == ('optimizer', 'param_groups', 0, 'lr')\n"
      "assert m.version == '1.0.0'\n"
      "print('python ok')\n");
  EXPECT_NE(out.find("python ok"), std::string::npos) << out;
}

// Two, three and four ranks' pieces saved; read whole, loaded into one
// process, and read back piece by piece at another world size.
TEST(Dcp, ShardedSaveOfFlatPiecesReadsBackWholeAndAtAnyWorldSize) {
  auto [model, adam] = trained(3);
  for (int world : {2, 3, 4}) {
    SCOPED_TRACE("saved by " + std::to_string(world) + " ranks");
    const std::string ckpt = dir() + "/dcp_world" + std::to_string(world);
    save_as_ranks(ckpt, *model, *adam, world, 7);
    EXPECT_TRUE(fabric::fs::exists(ckpt + "/.metadata"));
    EXPECT_TRUE(fabric::fs::exists(ckpt + "/meta.pt"));
    for (int r = 0; r < world; ++r) EXPECT_TRUE(fabric::fs::exists(ckpt + "/" + fabric::dcp::data_file(r)));
    EXPECT_FALSE(fabric::fs::exists(ckpt + "/__0_0.metadata"));  // the ranks' parts are merged and gone
    EXPECT_FALSE(fabric::fs::exists(ckpt + ".partial"));
    EXPECT_TRUE(fabric::is_sharded_checkpoint(ckpt));

    // Loaded into one process: the same weights and Adam state.
    auto fresh = std::make_shared<MlpImpl>();
    auto fresh_adam = std::make_shared<torch::optim::Adam>(fresh->parameters(), torch::optim::AdamOptions(0.5));
    fabric::State state{{"model", fresh}, {"optimizer", fresh_adam}, {"step", 0}};
    fabric::load_checkpoint(ckpt, state);
    expect_same_params(*model, *fresh);
    expect_same_adam_state(*adam, *fresh_adam);
    EXPECT_EQ(state.at("step").to_int(), 7);
    EXPECT_DOUBLE_EQ(fresh_adam->param_groups()[0].options().get_lr(), 0.01);

    // Each rank of another world size reads just its piece.
    const fabric::dcp::Reader reader(ckpt);
    for (int other : {1, 3, 5}) {
      for (int r = 0; r < other; ++r) {
        for (const auto& p : model->named_parameters()) {
          const auto [lo, hi] = piece_of(p.value().numel(), r, other);
          auto piece = torch::full({hi - lo}, -1.0f);
          reader.read_flat("model." + p.key(), lo, piece);
          EXPECT_TRUE(torch::equal(piece, p.value().detach().reshape({-1}).narrow(0, lo, hi - lo)))
              << p.key() << " rank " << r << " of " << other;
        }
      }
    }
  }
}

// Python's own readers on ours: dcp_to_torch_save, Lightning's
// consolidate_checkpoint, and Lightning's fabric.load at another world size
// (ModelParallelStrategy: FSDP2 over gloo).
TEST(Dcp, PythonAndLightningReadOurShardedCheckpoint) {
  auto [model, adam] = trained(4);
  const std::string ckpt = dir() + "/dcp_for_python";
  save_as_ranks(ckpt, *model, *adam, 2, 9);
  const std::string full = dir() + "/dcp_for_python_full.pt";
  fabric::save_checkpoint(full, {{"model", model}, {"optimizer", adam}, {"step", 9}});
  const std::string script =
      "import sys, torch\n"
      "from torch.distributed.checkpoint.format_utils import dcp_to_torch_save\n"
      + kPythonMlp +
      "ckpt, full, out = sys.argv[1], sys.argv[2], sys.argv[3]\n"
      "ref = torch.load(full)\n"
      "names = [n for n, _ in Mlp().named_parameters()]\n"
      "def check(sd, where):\n"
      "    for n in names:\n"
      "        assert torch.equal(sd['model'][n], ref['model'][n]), (where, n)\n"
      "        for k in ('exp_avg', 'exp_avg_sq', 'step'):\n"
      "            assert torch.equal(sd['optimizer']['state'][n][k], ref['optimizer']['state'][names.index(n)][k]), (where, n, k)\n"
      "    assert sd['optimizer']['param_groups'][0]['params'] == names\n"
      "    assert sd['optimizer']['param_groups'][0]['lr'] == 0.01\n"
      "if sys.argv[4] == 'convert':\n"
      "    dcp_to_torch_save(ckpt, out)\n"
      "    check(torch.load(out), 'dcp_to_torch_save')\n"
      "    import subprocess\n"
      "    subprocess.run([sys.executable, '-m', 'lightning.fabric.utilities.consolidate_checkpoint', ckpt,\n"
      "                    '--output_file', out + '.lightning'], check=True)\n"
      "    whole = torch.load(out + '.lightning')\n"
      "    check(whole, 'lightning consolidate_checkpoint')\n"
      "    assert whole['step'] == 9, whole.keys()\n"
      "    print('convert ok')\n"
      "    sys.exit(0)\n"
      "import lightning as L\n"
      "from lightning.fabric.strategies import ModelParallelStrategy\n"
      "from torch.distributed.fsdp import fully_shard\n"
      "from torch.distributed.checkpoint.state_dict import get_state_dict, StateDictOptions\n"
      "def par(m, mesh):\n"
      "    fully_shard(m, mesh=mesh['data_parallel'])\n"
      "    return m\n"
      "world = int(sys.argv[4])\n"
      "fabric = L.Fabric(accelerator='cpu', devices=world, strategy=ModelParallelStrategy(par, data_parallel_size=world, tensor_parallel_size=1))\n"
      "fabric.launch()\n"
      "m = fabric.setup_module(Mlp())\n"
      "opt = fabric.setup_optimizers(torch.optim.Adam(m.parameters(), lr=0.5))\n"
      "rest = fabric.load(ckpt, {'model': m, 'optimizer': opt})\n"
      "assert rest == {'step': 9}, rest\n"
      "msd, osd = get_state_dict(m.module, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))\n"
      "if fabric.global_rank == 0:\n"
      "    check({'model': msd, 'optimizer': osd}, 'lightning')\n"
      "    print('lightning ok')\n";
  const std::string path = dir() + "/dcp_read_ours.py";
  std::ofstream(path) << script;
  const std::string base = "MASTER_PORT=" + testutil::lightning_port() + " " + testutil::python() + " " + path + " " + ckpt + " " + full + " " + dir() + "/dcp_converted.pt ";
  auto convert = testutil::run_command(base + "convert");
  EXPECT_EQ(convert.status, 0) << convert.output;
  EXPECT_NE(convert.output.find("convert ok"), std::string::npos) << convert.output;
  auto lightning = testutil::run_command(base + "3");  // saved by 2 ranks, loaded by 3
  EXPECT_EQ(lightning.status, 0) << lightning.output;
  EXPECT_NE(lightning.output.find("lightning ok"), std::string::npos) << lightning.output;
}

// Ours on Python's: Lightning's layout (ModelParallelStrategy, 2 ranks, meta.pt
// beside) and a plain dcp.save of FSDP2's get_state_dict (no meta.pt), loaded
// into one process; the next Adam step matches Python's.
TEST(Dcp, WeLoadWhatPythonsFsdp2AndLightningWrite) {
  const std::string out = dir() + "/from_python_dcp";
  fabric::fs::remove_all(out);
  const std::string script =
      "import sys, torch\n"
      "import torch.distributed.checkpoint as dcp\n"
      "import lightning as L\n"
      "from lightning.fabric.strategies import ModelParallelStrategy\n"
      "from torch.distributed.fsdp import fully_shard\n"
      "from torch.distributed.checkpoint.state_dict import get_state_dict, StateDictOptions\n"
      + kPythonMlp +
      "out = sys.argv[1]\n"
      "def par(m, mesh):\n"
      "    fully_shard(m, mesh=mesh['data_parallel'])\n"
      "    return m\n"
      "fabric = L.Fabric(accelerator='cpu', devices=2, strategy=ModelParallelStrategy(par, data_parallel_size=2, tensor_parallel_size=1))\n"
      "fabric.launch()\n"
      "torch.manual_seed(0)\n"
      "m = fabric.setup_module(Mlp())\n"
      "opt = fabric.setup_optimizers(torch.optim.Adam(m.parameters(), lr=0.01, betas=(0.8, 0.99)))\n"
      "torch.manual_seed(1)\n"
      "batches = [torch.randn(6, 5) for _ in range(4)]\n"
      "for x in batches[:3]:\n"
      "    opt.zero_grad()\n"
      "    fabric.backward(m(x).pow(2).sum())\n"
      "    opt.step()\n"
      "fabric.save(out + '/lightning', {'model': m, 'optimizer': opt, 'step': 3, 'note': 'py'})\n"
      "msd, osd = get_state_dict(m.module, opt)\n"
      "dcp.save({'model': msd, 'optimizer': osd}, checkpoint_id=out + '/plain')\n"
      "fmsd, fosd = get_state_dict(m.module, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))\n"
      "opt.zero_grad()\n"
      "fabric.backward(m(batches[3]).pow(2).sum())\n"
      "opt.step()\n"
      "nmsd, _ = get_state_dict(m.module, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))\n"
      "if fabric.global_rank == 0:\n"
      "    names = list(fmsd.keys())\n"
      "    torch.save({'model': fmsd, 'exp_avg': [fosd['state'][n]['exp_avg'] for n in names], 'next': nmsd,\n"
      "                'x': batches[3]}, out + '/reference.pt')\n"
      "    print('python ok')\n";
  fabric::fs::make_directories(out);
  const std::string path = dir() + "/dcp_write_python.py";
  std::ofstream(path) << script;
  auto result = testutil::run_command("MASTER_PORT=" + testutil::lightning_port() + " " + testutil::python() + " " +
                                      path + " " + out);
  ASSERT_EQ(result.status, 0) << result.output;
  const auto ref = fabric::read_checkpoint(out + "/reference.pt").toGenericDict();
  const auto ref_model = ref.at("model").toGenericDict();
  const auto ref_next = ref.at("next").toGenericDict();
  const auto ref_exp_avg = ref.at("exp_avg").toList();
  const auto x = ref.at("x").toTensor();
  for (const std::string which : {"lightning", "plain"}) {
    SCOPED_TRACE(which);
    EXPECT_TRUE(fabric::is_sharded_checkpoint(out + "/" + which));
    auto model = std::make_shared<MlpImpl>();
    auto adam = std::make_shared<torch::optim::Adam>(model->parameters(), torch::optim::AdamOptions(0.5));
    fabric::State state{{"model", model}, {"optimizer", adam}};
    if (which == "lightning") state.emplace("step", 0);
    auto loaded = fabric::load_checkpoint(out + "/" + which, state);
    if (which == "lightning") {
      EXPECT_EQ(state.at("step").to_int(), 3);
      ASSERT_TRUE(loaded.remainder.count("note"));
      EXPECT_EQ(loaded.remainder.at("note").to_string(), "py");
    }
    auto params = model->named_parameters();
    for (size_t i = 0; i < params.size(); ++i) {
      EXPECT_TRUE(torch::equal(params[i].value(), ref_model.at(params[i].key()).toTensor())) << params[i].key();
      auto& st = static_cast<torch::optim::AdamParamState&>(*adam->state().at(params[i].value().unsafeGetTensorImpl()));
      EXPECT_TRUE(torch::equal(st.exp_avg(), ref_exp_avg.get(i).toTensor())) << params[i].key();
      EXPECT_EQ(st.step(), 3);
    }
    const auto& options = static_cast<torch::optim::AdamOptions&>(adam->param_groups()[0].options());
    EXPECT_DOUBLE_EQ(options.lr(), 0.01);
    EXPECT_DOUBLE_EQ(std::get<0>(options.betas()), 0.8);
    // The next step, here, equals Python's (FSDP2's reduction of two ranks'
    // halves of the batch is a sum: the same gradient up to rounding).
    adam->zero_grad();
    model->forward(x).pow(2).sum().backward();
    adam->step();
    for (const auto& p : model->named_parameters()) {
      EXPECT_TRUE(torch::allclose(p.value(), ref_next.at(p.key()).toTensor(), 1e-5, 1e-6)) << p.key();
    }
  }
  // And the converter writes one full file of it.
  const std::string merged = out + "/merged.pt";
  fabric::consolidate_checkpoint(out + "/plain", merged);
  const auto file = fabric::read_checkpoint(merged).toGenericDict();
  EXPECT_TRUE(torch::equal(file.at("model").toGenericDict().at("fc1.weight").toTensor(),
                           ref_model.at("fc1.weight").toTensor()));
}

TEST(Dcp, DamagedDirectoriesAreNamedInTheError) {
  auto [model, adam] = trained(5);
  const std::string good = dir() + "/dcp_good";
  save_as_ranks(good, *model, *adam, 2, 1);
  auto copy = [&](const std::string& name) {
    const std::string to = dir() + "/" + name;
    fabric::fs::remove_all(to);
    EXPECT_EQ(testutil::run_command("cp -r " + good + " " + to).status, 0);
    return to;
  };
  auto load = [&](const std::string& path) {
    return error_of([&] { fabric::read_checkpoint(path); });
  };
  {
    const auto d = copy("dcp_missing_file");
    fabric::fs::remove_all(d + "/__1_0.distcp");
    const auto e = load(d);
    EXPECT_NE(e.find("names __1_0.distcp"), std::string::npos) << e;
    EXPECT_NE(e.find("which is not there"), std::string::npos) << e;
  }
  {
    const auto d = copy("dcp_truncated");
    ASSERT_EQ(::truncate((d + "/__0_0.distcp").c_str(), 1000), 0);
    const auto e = load(d);
    EXPECT_NE(e.find(d + "/__0_0.distcp is truncated"), std::string::npos) << e;
  }
  {
    const auto d = copy("dcp_garbage_item");
    std::fstream f(d + "/__0_0.distcp", std::ios::in | std::ios::out | std::ios::binary);
    f.write("garbage!", 8);
    f.close();
    const auto e = load(d);
    EXPECT_NE(e.find(d + "/__0_0.distcp: the item of "), std::string::npos) << e;
  }
  {
    const auto d = copy("dcp_version");
    auto bytes = read_bytes(d + "/.metadata");
    const std::string v = fabric::dcp::kVersion;
    auto at = std::search(bytes.begin(), bytes.end(), v.begin(), v.end());
    ASSERT_NE(at, bytes.end());
    std::copy_n("9.9.9", 5, at);
    std::ofstream(d + "/.metadata", std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    const auto e = load(d);
    EXPECT_NE(e.find("version '9.9.9' is not one torchfabric reads"), std::string::npos) << e;
    EXPECT_NE(e.find(d + "/.metadata"), std::string::npos) << e;
  }
  {
    const auto d = copy("dcp_garbage_metadata");
    std::ofstream(d + "/.metadata", std::ios::binary) << "\x80\x02garbage";
    const auto e = load(d);
    EXPECT_NE(e.find(d + "/.metadata"), std::string::npos) << e;
  }
  {  // chunks that leave part of a tensor out
    fabric::dcp::Metadata m;
    auto& w = m.entries["w"];
    w.size = {2, 3};
    w.chunks = {{{0, 0}, {1, 3}}};
    w.storage = {{"__0_0.distcp", 0, 10}};
    const auto bytes = fabric::dcp::write_metadata(m);
    const auto e = error_of([&] { fabric::dcp::read_metadata(bytes.data(), bytes.size(), "M"); });
    EXPECT_NE(e.find("the chunks of 'w' hold 3 of its 6 elements"), std::string::npos) << e;
    w.chunks = {{{0, 0}, {2, 3}}, {{1, 1}, {1, 1}}};
    w.storage.push_back({"__0_0.distcp", 64, 10});
    const auto overlap = fabric::dcp::write_metadata(m);
    const auto e2 = error_of([&] { fabric::dcp::read_metadata(overlap.data(), overlap.size(), "M"); });
    EXPECT_NE(e2.find("overlapping chunks"), std::string::npos) << e2;
  }
}
