// Checkpoints: round trips, exact resume, Python interoperability (torch.load of
// our files, our loading of torch.save files, same outputs and same next Adam
// step), atomic writes under SIGKILL, and every error by message.
#include <torch/torch.h>

#include <ATen/CPUGeneratorImpl.h>

#include <csignal>
#include <cstring>
#include <random>
#include <functional>
#include <tuple>
#include <fstream>
#include <iterator>
#include <thread>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "checkpoint/checkpoint.h"
#include "data/tensor_dataset.h"
#include "fabric/fabric.h"
#include "checkpoint/filesystem.h"
#include "checkpoint/serialization.h"
#include "optim/codec.h"
#include "test_util.h"

namespace {

struct MlpImpl : torch::nn::Module {
  MlpImpl() : fc1(register_module("fc1", torch::nn::Linear(5, 8))),
              fc2(register_module("fc2", torch::nn::Linear(8, 3))) {}
  torch::Tensor forward(torch::Tensor x) { return fc2->forward(torch::relu(fc1->forward(x))); }
  torch::nn::Linear fc1, fc2;
};

std::string dir() {
  static const std::string d = [] {
    const std::string path = ::testing::TempDir() + "/checkpoint_test";
    fabric::fs::remove_all(path);
    fabric::fs::make_directories(path);
    return path;
  }();
  return d;
}

std::vector<char> read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void expect_same_params(const torch::nn::Module& a, const torch::nn::Module& b) {
  auto pa = a.named_parameters();
  auto pb = b.named_parameters();
  ASSERT_EQ(pa.size(), pb.size());
  for (size_t i = 0; i < pa.size(); ++i) {
    EXPECT_TRUE(torch::equal(pa[i].value(), pb[i].value())) << pa[i].key();
  }
}

void expect_same_adam_state(torch::optim::Adam& a, torch::optim::Adam& b) {
  auto sa = fabric::optimizer_state_dict(a).toGenericDict().at("state").toGenericDict();
  auto sb = fabric::optimizer_state_dict(b).toGenericDict().at("state").toGenericDict();
  ASSERT_EQ(sa.size(), sb.size());
  for (const auto& item : sa) {
    auto x = item.value().toGenericDict();
    auto y = sb.at(item.key()).toGenericDict();
    for (const char* key : {"step", "exp_avg", "exp_avg_sq"}) {
      EXPECT_TRUE(torch::equal(x.at(key).toTensor(), y.at(key).toTensor()))
          << "param " << item.key().toInt() << " " << key;
    }
  }
}

// MlpImpl in Python: same layers, same parameter names.
const std::string kPythonMlp =
    "class Mlp(torch.nn.Module):\n"
    "    def __init__(self):\n"
    "        super().__init__()\n"
    "        self.fc1 = torch.nn.Linear(5, 8)\n"
    "        self.fc2 = torch.nn.Linear(8, 3)\n"
    "    def forward(self, x):\n"
    "        return self.fc2(torch.relu(self.fc1(x)))\n";

// The optimizers the Lightning tests continue, the same in C++ and Python.
std::shared_ptr<torch::optim::Optimizer> make_optimizer(const std::string& name,
                                                        std::vector<torch::Tensor> p) {
  if (name == "sgd") return std::make_shared<torch::optim::SGD>(p, torch::optim::SGDOptions(0.05).momentum(0.9));
  if (name == "adam") return std::make_shared<torch::optim::Adam>(p, torch::optim::AdamOptions(0.01));
  return std::make_shared<torch::optim::AdamW>(p, torch::optim::AdamWOptions(0.01).weight_decay(0.1));
}
const std::string kPythonOptimizers =
    "def make(name, m):\n"
    "    if name == 'sgd': return torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)\n"
    "    if name == 'adam': return torch.optim.Adam(m.parameters(), lr=0.01)\n"
    "    return torch.optim.AdamW(m.parameters(), lr=0.01, weight_decay=0.1)\n";

std::string run_python(const std::string& name, const std::string& script) {
  const std::string path = dir() + "/" + name + ".py";
  std::ofstream(path) << script;
  auto result = testutil::run_command(testutil::python() + " " + path);
  EXPECT_EQ(result.status, 0) << result.output;
  return result.output;
}

}  // namespace

TEST(Checkpoint, RoundTripRestoresEverythingInPlace) {
  fabric::Fabric fabric({.accelerator = "cpu"});
  torch::manual_seed(1);
  auto model = std::make_shared<MlpImpl>();
  auto optimizer = std::make_shared<torch::optim::Adam>(model->parameters(), 1e-2);
  auto [net, opt] = fabric.setup(model, optimizer);
  for (int i = 0; i < 3; ++i) {
    opt.zero_grad();
    fabric.backward(net(torch::randn({4, 5})).pow(2).mean());
    opt.step();
  }
  const std::string path = dir() + "/roundtrip.pt";
  auto marker = torch::arange(6).view({2, 3});
  fabric.save(path, {{"model", net}, {"optimizer", opt}, {"epoch", 4}, {"lr", 0.5},
                     {"name", "run-7"}, {"marker", marker},
                     {"extra", fabric::State{{"best", 0.25}, {"note", "nested"}}},
                     {"rng", fabric::RngState::capture()}});
  const auto draw = torch::rand({3});
  EXPECT_FALSE(fabric::fs::exists(path + ".tmp." + std::to_string(::getpid())));

  torch::manual_seed(99);  // different weights and RNG state
  auto model2 = std::make_shared<MlpImpl>();
  auto optimizer2 = std::make_shared<torch::optim::Adam>(model2->parameters(), 1e-3);
  auto [net2, opt2] = fabric.setup(model2, optimizer2);
  fabric::State state{{"model", net2}, {"optimizer", opt2}, {"epoch", 0},
                      {"extra", fabric::State{{"best", 1.0}}}, {"rng", fabric::RngState()}};
  auto result = fabric.load(path, state);
  expect_same_params(*model, *model2);
  expect_same_adam_state(*optimizer, *optimizer2);
  EXPECT_EQ(static_cast<torch::optim::AdamOptions&>(optimizer2->param_groups()[0].options()).lr(), 1e-2);
  EXPECT_EQ(state.at("epoch").to_int(), 4);
  EXPECT_EQ(state.at("extra").nested().at("best").to_double(), 0.25);
  EXPECT_TRUE(torch::equal(torch::rand({3}), draw)) << "RNG state was not restored";
  // What was not asked for comes back.
  ASSERT_EQ(result.remainder.size(), 4u);
  EXPECT_EQ(result.remainder.at("name").to_string(), "run-7");
  EXPECT_EQ(result.remainder.at("lr").to_double(), 0.5);
  EXPECT_TRUE(torch::equal(result.remainder.at("marker").to_tensor(), marker));
  // The next steps agree too.
  auto x = torch::randn({4, 5});
  opt.zero_grad();
  fabric.backward(net(x).pow(2).mean());
  opt.step();
  opt2.zero_grad();
  fabric.backward(net2(x).pow(2).mean());
  opt2.step();
  expect_same_params(*model, *model2);
}

TEST(Checkpoint, ResumeMidEpochIsBitExact) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(5);
  fabric::data::TensorDataset data(torch::randn({40, 5}, gen), torch::randint(0, 3, {40}, gen, torch::kLong));
  const int64_t batch = 8;  // 5 steps per epoch; resume in the middle of epoch 2
  auto train = [&](fabric::Fabric& fabric, auto& net, auto& opt, auto& loader, int64_t from,
                   int64_t to) {
    const int64_t per_epoch = static_cast<int64_t>(loader.size());
    int64_t step = from;
    loader.set_epoch(step / per_epoch);
    int64_t skip = step % per_epoch;
    while (step < to) {
      for (auto& b : loader) {
        if (skip > 0) {
          --skip;
          continue;
        }
        if (step == to) break;
        opt.zero_grad();
        fabric.backward(torch::cross_entropy_loss(net(b.data), b.target));
        opt.step();
        ++step;
      }
    }
  };
  const std::string path = dir() + "/resume.pt";
  // 20 steps in one go.
  fabric::Fabric a({.accelerator = "cpu"});
  a.seed_everything(3);
  auto model_a = std::make_shared<MlpImpl>();
  auto [net_a, opt_a] = a.setup(model_a, std::make_shared<torch::optim::Adam>(model_a->parameters(), 1e-2));
  auto loader_a = a.setup_dataloader(data, {.batch_size = batch, .shuffle = true});
  train(a, net_a, opt_a, loader_a, 0, 20);
  // 12 steps, save; a fresh Fabric, model and optimizer load and do 8 more.
  fabric::Fabric b({.accelerator = "cpu"});
  b.seed_everything(3);
  auto model_b = std::make_shared<MlpImpl>();
  auto adam_b = std::make_shared<torch::optim::Adam>(model_b->parameters(), 1e-2);
  auto [net_b, opt_b] = b.setup(model_b, adam_b);
  auto loader_b = b.setup_dataloader(data, {.batch_size = batch, .shuffle = true});
  train(b, net_b, opt_b, loader_b, 0, 12);
  b.save(path, {{"model", net_b}, {"optimizer", opt_b}, {"step", 12}});

  fabric::Fabric c({.accelerator = "cpu"});
  c.seed_everything(3);
  torch::manual_seed(1234);
  auto model_c = std::make_shared<MlpImpl>();
  auto adam_c = std::make_shared<torch::optim::Adam>(model_c->parameters(), 1e-2);
  auto [net_c, opt_c] = c.setup(model_c, adam_c);
  auto loader_c = c.setup_dataloader(data, {.batch_size = batch, .shuffle = true});
  fabric::State state{{"model", net_c}, {"optimizer", opt_c}, {"step", 0}};
  c.load(path, state);
  train(c, net_c, opt_c, loader_c, state.at("step").to_int(), 20);
  expect_same_params(*model_a, *model_c);
  expect_same_adam_state(*static_cast<torch::optim::Adam*>(opt_a.optimizer().get()), *adam_c);
}

TEST(Checkpoint, PythonLoadsOurFileAndGetsTheSameTensorsAndOutputs) {
  torch::manual_seed(2);
  auto model = std::make_shared<MlpImpl>();
  torch::optim::Adam adam(model->parameters(), 1e-2);
  auto x = torch::randn({6, 5});
  adam.zero_grad();
  model->forward(x).sum().backward();
  adam.step();
  const auto out = model->forward(x).detach();
  const std::string path = dir() + "/for_python.pt";
  fabric::save_checkpoint(path, {{"model", model},
                                 {"optimizer", std::shared_ptr<torch::optim::Optimizer>(
                                                   &adam, [](torch::optim::Optimizer*) {})},
                                 {"input", x}, {"epoch", 3}, {"tag", "cpp"}});
  const std::string echoed = dir() + "/echoed.pt";
  const std::string script =
      "import torch\n"
      "ckpt = torch.load('" + path + "')  # weights_only=True: plain containers only\n"
      "assert ckpt['epoch'] == 3 and ckpt['tag'] == 'cpp', ckpt.keys()\n"
      + kPythonMlp +
      "m = Mlp()\n"
      "m.load_state_dict(ckpt['model'])\n"
      "opt = torch.optim.Adam(m.parameters(), lr=0.5)\n"
      "opt.load_state_dict(ckpt['optimizer'])\n"
      "assert opt.param_groups[0]['lr'] == 0.01\n"
      "with torch.no_grad():\n"
      "    out = m(ckpt['input'])\n"
      "torch.save({'model': dict(ckpt['model']), 'output': out,\n"
      "            'exp_avg0': opt.state[opt.param_groups[0]['params'][0]]['exp_avg']}, '" + echoed + "')\n"
      "print('python ok')\n";
  EXPECT_NE(run_python("load_ours", script).find("python ok"), std::string::npos);
  auto back = torch::pickle_load(read_bytes(echoed)).toGenericDict();
  auto sd = back.at("model").toGenericDict();
  for (const auto& item : model->named_parameters()) {
    EXPECT_TRUE(torch::equal(sd.at(item.key()).toTensor(), item.value())) << item.key();
  }
  EXPECT_TRUE(torch::allclose(back.at("output").toTensor(), out, 1e-6, 1e-6));
  auto state = fabric::optimizer_state_dict(adam).toGenericDict().at("state").toGenericDict();
  EXPECT_TRUE(torch::equal(back.at("exp_avg0").toTensor(),
                           state.at(0).toGenericDict().at("exp_avg").toTensor()));
}

TEST(Checkpoint, AdamStateSavedByPythonLoadsAndTheNextStepMatches) {
  const std::string path = dir() + "/from_python.pt";
  const std::string script =
      "import torch\n"
      "torch.manual_seed(0)\n"
      + kPythonMlp +
      "m = Mlp()\n"
      "opt = torch.optim.Adam(m.parameters(), lr=0.01, betas=(0.8, 0.99), eps=1e-7)\n"
      "x, y = torch.randn(6, 5), torch.randn(6, 3)\n"
      "for _ in range(3):\n"
      "    opt.zero_grad(); torch.nn.functional.mse_loss(m(x), y).backward(); opt.step()\n"
      "import copy  # state_dict() shares storage with the live tensors\n"
      "ckpt = copy.deepcopy({'model': dict(m.state_dict()), 'optimizer': opt.state_dict()})\n"
      "ckpt.update({'x': x, 'y': y})\n"
      "opt.zero_grad(); torch.nn.functional.mse_loss(m(x), y).backward(); opt.step()\n"
      "ckpt['next'] = dict(m.state_dict())\n"
      "torch.save(ckpt, '" + path + "')\n"
      "print('python ok')\n";
  EXPECT_NE(run_python("save_theirs", script).find("python ok"), std::string::npos);
  fabric::Fabric fabric({.accelerator = "cpu"});
  auto model = std::make_shared<MlpImpl>();
  auto adam = std::make_shared<torch::optim::Adam>(model->parameters(), 1e-3);
  auto [net, opt] = fabric.setup(model, adam);
  fabric::State state{{"model", net}, {"optimizer", opt}};
  auto rest = fabric.load(path, state);
  auto& options = static_cast<torch::optim::AdamOptions&>(adam->param_groups()[0].options());
  EXPECT_EQ(options.lr(), 0.01);
  EXPECT_EQ(std::get<0>(options.betas()), 0.8);
  EXPECT_EQ(options.eps(), 1e-7);
  auto x = rest.remainder.at("x").to_tensor(), y = rest.remainder.at("y").to_tensor();
  opt.zero_grad();
  fabric.backward(torch::mse_loss(net(x), y));
  opt.step();
  auto next = rest.remainder.at("next").value().toGenericDict();
  for (const auto& item : model->named_parameters()) {
    const auto& expected = next.at(item.key()).toTensor();
    EXPECT_TRUE(torch::allclose(item.value(), expected, 1e-6, 1e-7))
        << item.key() << " max diff " << (item.value() - expected).abs().max().item<double>();
  }
}

TEST(Checkpoint, ErrorsNameTheProblem) {
  auto model = std::make_shared<MlpImpl>();
  const std::string good = dir() + "/good.pt";
  fabric::save_checkpoint(good, {{"model", model}, {"epoch", 1}});

  // Truncated.
  auto bytes = read_bytes(good);
  const std::string truncated = dir() + "/truncated.pt";
  std::ofstream(truncated, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size() / 2));
  fabric::State state{{"model", model}};
  EXPECT_THROW_WITH(fabric::load_checkpoint(truncated, state), truncated, "truncated or corrupt");
  // Not a checkpoint.
  const std::string text = dir() + "/notes.txt";
  std::ofstream(text) << "hello";
  EXPECT_THROW_WITH(fabric::load_checkpoint(text, state), text, "is not a checkpoint");
  // torch.save's legacy format: named, with the conversion.
  const std::string legacy = dir() + "/legacy.pt";
  auto python = testutil::run_command(
      testutil::python() + " -c \"import torch; torch.save({'w': torch.ones(2)}, '" + legacy +
      "', _use_new_zipfile_serialization=False)\"");
  ASSERT_EQ(python.status, 0) << python.output;
  EXPECT_THROW_WITH(fabric::load_checkpoint(legacy, state), legacy, "legacy (non-zip) format",
                    "torch.save(torch.load(");
  EXPECT_THROW_WITH(fabric::load_checkpoint(dir() + "/absent.pt", state), "not found", "absent.pt");
  // Missing key.
  fabric::State wants_more{{"model", model}, {"optimizer_state", 0}};
  EXPECT_THROW_WITH(fabric::load_checkpoint(good, wants_more), "has no 'optimizer_state'",
                    "'epoch'", "'model'");
  // Shape mismatch and unexpected / missing parameters, with both shapes.
  struct WiderImpl : torch::nn::Module {
    WiderImpl() : fc1(register_module("fc1", torch::nn::Linear(5, 9))),
                  head(register_module("head", torch::nn::Linear(9, 3))) {}
    torch::nn::Linear fc1, head;
  };
  auto wider = std::make_shared<WiderImpl>();
  fabric::State mismatch{{"model", wider}};
  EXPECT_THROW_WITH(fabric::load_checkpoint(good, mismatch), "fc1.weight: checkpoint [8, 5] vs",
                    "[9, 5]", "missing from the checkpoint: head.bias, head.weight",
                    "unexpected in the checkpoint: fc2.bias, fc2.weight");
  // strict=false loads what matches and reports the rest.
  auto result = fabric::load_checkpoint(good, mismatch, /*strict=*/false);
  EXPECT_EQ(result.mismatches.mismatched.size(), 2u);
  EXPECT_EQ(result.mismatches.missing.size(), 2u);
  EXPECT_EQ(result.mismatches.unexpected.size(), 2u);
  fabric::State partial{{"model", model}, {"absent", 1}};
  EXPECT_EQ(fabric::load_checkpoint(good, partial, false).missing_keys,
            std::vector<std::string>{"absent"});
}

// A strict load that fails changes nothing: here the model entry matches but the
// optimizer entry (another model's Adam state) and a nested key do not; the
// model, the optimizer state and the values keep what they had.
TEST(Checkpoint, FailedStrictLoadChangesNothing) {
  auto saved_model = std::make_shared<MlpImpl>();
  auto other = std::make_shared<torch::nn::LinearImpl>(3, 2);
  auto other_adam = std::make_shared<torch::optim::Adam>(other->parameters(), 1e-2);
  torch::mse_loss(other->forward(torch::randn({4, 3})), torch::zeros({4, 2})).backward();
  other_adam->step();
  const std::string path = dir() + "/mismatched_optimizer.pt";
  fabric::save_checkpoint(path, {{"model", saved_model}, {"optimizer", other_adam},
                                 {"meta", fabric::State{{"epoch", 4}}}});

  auto model = std::make_shared<MlpImpl>();
  auto adam = std::make_shared<torch::optim::Adam>(model->parameters(), 1e-2);
  std::vector<torch::Tensor> before;
  for (const auto& p : model->parameters()) before.push_back(p.detach().clone());
  fabric::State state{{"model", model}, {"optimizer", adam},
                      {"meta", fabric::State{{"epoch", 0}, {"batch", 0}}}};
  EXPECT_THROW_WITH(fabric::load_checkpoint(path, state), "nothing was changed", "'optimizer'",
                    "parameter group", "'meta.batch' is not in the checkpoint");
  auto params = model->parameters();
  for (size_t i = 0; i < params.size(); ++i) EXPECT_TRUE(torch::equal(params[i], before[i])) << i;
  EXPECT_TRUE(adam->state().empty());
  EXPECT_EQ(state.at("meta").nested().at("epoch").to_int(), 0);
}

// What Python really writes: torch.save(model.state_dict()) (an OrderedDict
// with _metadata), every pickle protocol, every dtype, views and slices, tensors
// sharing a storage, torch.Size/dtype/device, nested OrderedDicts, and an
// argparse.Namespace (read as a placeholder naming its class, not an error).
TEST(Checkpoint, ReadsWhatPythonReallyWrites) {
  const std::string d = dir() + "/python_files";
  fabric::fs::make_directories(d);
  const std::string script = d + "/write.py";
  std::ofstream(script) << R"(import argparse, collections, sys, torch
d = sys.argv[1]
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
torch.save(net.state_dict(), d + '/state_dict.pt')
x = torch.arange(10.).reshape(2, 5) / 10
open(d + '/expected.txt', 'w').write(' '.join(repr(v) for v in net(x).flatten().tolist()))
for proto in (2, 3, 4, 5):
    torch.save({'sd': net.state_dict()}, d + '/proto%d.pt' % proto, pickle_protocol=proto)
dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.int16,
          torch.int32, torch.int64, torch.uint8, torch.bool]
tensors = collections.OrderedDict((str(t).split('.')[1], (torch.arange(6) % 3).to(t).reshape(2, 3)) for t in dtypes)
base = torch.arange(12.).reshape(3, 4)
torch.save({'tensors': tensors, 'view': base.t(), 'slice': base[1:, 2:], 'tied_a': base, 'tied_b': base,
            'size': torch.Size([2, 3]), 'dtype': torch.float16, 'device': torch.device('cpu'),
            'nested': collections.OrderedDict(inner=collections.OrderedDict(x=1.5)), 'none': None,
            'flags': [True, False], 'text': 'hi', 'big': 2**40, 'neg': -7,
            'hparams': argparse.Namespace(lr=0.1, name='run')}, d + '/mixed.pt')
)";
  auto python = testutil::run_command(testutil::python() + " " + script + " " + d);
  ASSERT_EQ(python.status, 0) << python.output;

  // A bare Python state dict into the same architecture, then the same outputs.
  auto net = torch::nn::Sequential(torch::nn::Linear(5, 8), torch::nn::ReLU(), torch::nn::Linear(8, 3));
  fabric::load_raw(d + "/state_dict.pt", *net);
  std::ifstream expected_file(d + "/expected.txt");
  std::vector<float> expected;
  for (double v; expected_file >> v;) expected.push_back(static_cast<float>(v));
  auto y = net->forward(torch::arange(10, torch::kFloat).reshape({2, 5}) / 10).flatten();
  ASSERT_EQ(y.numel(), static_cast<int64_t>(expected.size()));
  EXPECT_TRUE(torch::allclose(y, torch::tensor(expected), 1e-6, 1e-6));

  const auto reference = fabric::read_checkpoint(d + "/state_dict.pt").toGenericDict();
  for (int proto = 2; proto <= 5; ++proto) {
    SCOPED_TRACE("protocol " + std::to_string(proto));
    const auto file = fabric::read_checkpoint(d + "/proto" + std::to_string(proto) + ".pt");
    ASSERT_TRUE(file.isGenericDict());
    const auto sd = file.toGenericDict().at("sd").toGenericDict();
    ASSERT_EQ(sd.size(), 4u);
    for (const auto& item : reference) {
      EXPECT_TRUE(torch::equal(sd.at(item.key()).toTensor(), item.value().toTensor()));
    }
  }

  const auto mixed = fabric::read_checkpoint(d + "/mixed.pt").toGenericDict();
  const auto tensors = mixed.at("tensors").toGenericDict();
  const std::vector<std::pair<std::string, c10::ScalarType>> dtypes = {
      {"float32", torch::kFloat}, {"float64", torch::kDouble}, {"float16", torch::kHalf},
      {"bfloat16", torch::kBFloat16}, {"int8", torch::kChar}, {"int16", torch::kShort},
      {"int32", torch::kInt}, {"int64", torch::kLong}, {"uint8", torch::kByte}, {"bool", torch::kBool}};
  for (const auto& [name, dtype] : dtypes) {
    SCOPED_TRACE(name);
    const auto t = tensors.at(name).toTensor();
    EXPECT_EQ(t.scalar_type(), dtype);
    EXPECT_TRUE(torch::equal(t, (torch::arange(6) % 3).to(dtype).reshape({2, 3})));
  }
  const auto base = torch::arange(12, torch::kFloat).reshape({3, 4});
  EXPECT_TRUE(torch::equal(mixed.at("view").toTensor(), base.t()));
  EXPECT_TRUE(torch::equal(mixed.at("slice").toTensor(), base.slice(0, 1).slice(1, 2)));
  EXPECT_EQ(mixed.at("tied_a").toTensor().data_ptr(), mixed.at("tied_b").toTensor().data_ptr());
  const auto size = mixed.at("size").toTupleRef().elements();
  ASSERT_EQ(size.size(), 2u);
  EXPECT_EQ(size[0].toInt() * 10 + size[1].toInt(), 23);
  EXPECT_EQ(mixed.at("dtype").toStringRef(), "torch.float16");
  EXPECT_EQ(mixed.at("device").toStringRef(), "cpu");
  EXPECT_EQ(mixed.at("nested").toGenericDict().at("inner").toGenericDict().at("x").toDouble(), 1.5);
  EXPECT_TRUE(mixed.at("none").isNone());
  EXPECT_EQ(mixed.at("big").toInt(), int64_t{1} << 40);
  EXPECT_EQ(mixed.at("neg").toInt(), -7);
  EXPECT_EQ(mixed.at("text").toStringRef(), "hi");
  const auto hparams = mixed.at("hparams").toGenericDict();
  EXPECT_EQ(hparams.at("__python_class__").toStringRef(), "argparse.Namespace");
  EXPECT_EQ(hparams.at("__state__").toGenericDict().at("lr").toDouble(), 0.1);
  // fabric.load takes what it is asked for; the Namespace stays in the remainder.
  fabric::State state{{"text", ""}, {"big", 0}};
  auto result = fabric::load_checkpoint(d + "/mixed.pt", state);
  EXPECT_EQ(state.at("text").to_string(), "hi");
  EXPECT_TRUE(result.remainder.count("hparams"));
}

// Dtypes Python pickles with _rebuild_tensor_v3 over an untyped storage
// (uint16/32/64, float8): read with their dtype and values, views included.
TEST(Checkpoint, ReadsUnsignedAndFloat8TensorsWithTheirDtype) {
  const std::string d = dir() + "/v3_dtypes";
  fabric::fs::make_directories(d);
  run_python("v3_dtypes", R"(import torch
d = ')" + d + R"('
names = ['uint16', 'uint32', 'uint64', 'float8_e4m3fn', 'float8_e5m2']
data, ref = {}, {}
for n in names:
    dt = getattr(torch, n)
    base = (torch.arange(12) * 3 % 11).to(dt).reshape(3, 4)
    data[n], data[n + '_view'] = base, base[1:, 1:].t()
    wide = torch.float32 if dt.is_floating_point else torch.int64
    ref[n], ref[n + '_view'] = base.to(wide), base[1:, 1:].t().to(wide)
data['uint64_big'] = torch.tensor([2**63 + 7, 1], dtype=torch.uint64)
ref['uint64_big'] = data['uint64_big'].view(torch.int64)
torch.save(data, d + '/data.pt')
torch.save(ref, d + '/ref.pt')
)");
  const auto data = fabric::read_checkpoint(d + "/data.pt").toGenericDict();
  const auto ref = fabric::read_checkpoint(d + "/ref.pt").toGenericDict();
  const std::map<std::string, c10::ScalarType> dtypes = {
      {"uint16", c10::kUInt16}, {"uint32", c10::kUInt32}, {"uint64", c10::kUInt64},
      {"float8_e4m3fn", c10::ScalarType::Float8_e4m3fn}, {"float8_e5m2", c10::ScalarType::Float8_e5m2}};
  for (const auto& [name, dtype] : dtypes) {
    for (const std::string& key : {name, name + "_view"}) {
      SCOPED_TRACE(key);
      const auto t = data.at(key).toTensor();
      const auto expected = ref.at(key).toTensor();
      EXPECT_EQ(t.scalar_type(), dtype);
      EXPECT_EQ(t.sizes(), expected.sizes());
      EXPECT_TRUE(torch::equal(t.to(expected.scalar_type()), expected));
    }
  }
  const auto big = data.at("uint64_big").toTensor();
  EXPECT_EQ(big.scalar_type(), c10::kUInt64);
  EXPECT_TRUE(torch::equal(big.view(torch::kLong), ref.at("uint64_big").toTensor()));
}

// A list that contains itself (9 bytes of pickle), 100 000-deep nesting, 3 000
// levels hidden behind shared chains (each 999 deep) and shared lists that expand to
// 2^60 values (found by make fuzz and in review): errors naming the file, not a
// stack overflow or a hang. 900 levels, which Python
// writes itself, still read.
TEST(Checkpoint, SelfContainingAndDeeplyNestedPicklesEndInAnError) {
  const std::string d = dir() + "/nesting";
  fabric::fs::make_directories(d);
  run_python("nesting", R"(import sys, torch, zipfile
d = ')" + d + R"('
l = []
l.append(l)
torch.save(l, d + '/self.pt')
t = []
t.append((t,))
torch.save({'x': t}, d + '/self_tuple.pt')
deep = []
for _ in range(900):
    deep = [deep]
sys.setrecursionlimit(10000)
torch.save({'deep': deep}, d + '/deep900.pt')
def replace_pickle(src, dst, pkl):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, 'w', zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info, pkl if info.filename.endswith('/data.pkl') else zin.read(info))
n = 100000
replace_pickle(d + '/self.pt', d + '/deep_lists.pt', b'\x80\x02' + b']' * n + b'a' * (n - 1) + b'.')
replace_pickle(d + '/self.pt', d + '/deep_tuples.pt', b'\x80\x02' + b')' + b'\x85' * n + b'.')
replace_pickle(d + '/self.pt', d + '/deep_dict_key.pt', b'\x80\x02}' + b')' + b'\x85' * n + b'K\x01s.')
# 60 lists, each holding the previous one twice (through the memo): 2^60 as a tree
dag = b'\x80\x02]q\x00'
for i in range(1, 61):
    dag += b'](h' + bytes([i - 1]) + b'h' + bytes([i - 1]) + b'eq' + bytes([i])
replace_pickle(d + '/self.pt', d + '/dag60.pt', dag + b'.')
# 3 chains of 999 lists, linked top-down (so no depth is known while they are
# built), the innermost list of each holding the previous chain: each chain
# alone is 999 deep, together about 3 000
import struct
def pack(i): return struct.pack('<I', i)
out, idx, heads = b'\x80\x02', 0, []
for j in range(3):
    first = idx
    for i in range(999):
        out += b']r' + pack(idx) + b'0'
        idx += 1
    for i in range(998):
        out += b'j' + pack(first + i) + b'j' + pack(first + i + 1) + b'a0'
    if heads:
        out += b'j' + pack(first + 998) + b'j' + pack(heads[-1]) + b'a0'
    heads.append(first)
out += b'(' + b''.join(b'j' + pack(h) for h in heads) + b'l.'
replace_pickle(d + '/self.pt', d + '/shared_chains.pt', out)
)");
  for (const std::string name : {"self", "self_tuple"}) {
    const std::string path = d + "/" + name + ".pt";
    EXPECT_THROW_WITH(fabric::read_checkpoint(path), {path, "contains itself"});
  }
  for (const std::string name : {"deep_lists", "deep_tuples", "deep_dict_key", "shared_chains"}) {
    const std::string path = d + "/" + name + ".pt";
    EXPECT_THROW_WITH(fabric::read_checkpoint(path), {path, "nested more than 1000 deep"});
  }
  EXPECT_THROW_WITH(fabric::read_checkpoint(d + "/dag60.pt"), {d + "/dag60.pt", "expand to more than"});
  auto deep = fabric::read_checkpoint(d + "/deep900.pt").toGenericDict().at("deep");
  int levels = 0;
  while (deep.isList() && deep.toListRef().size() == 1) {
    deep = deep.toListRef()[0];
    ++levels;
  }
  EXPECT_EQ(levels, 900);
}

// Every checkpoint input `make fuzz` found crashing or hanging the reader
// (tests/fuzz/crashes/, run from the repository root or Bazel's runfiles) now
// ends in an error naming the file.
TEST(Checkpoint, FuzzFindingsEndInAnErrorNamingTheFile) {
  const std::string folder = "tests/fuzz/crashes";
  std::vector<std::string> files;
  for (const auto& name : fabric::fs::list_directory(folder)) {
    if (name.rfind("checkpoint-", 0) == 0) files.push_back(folder + "/" + name);
  }
  ASSERT_GE(files.size(), 5u) << "the fuzz findings are missing from " << folder
                              << " (run the tests from the repository root)";
  for (const auto& path : files) {
    SCOPED_TRACE(path);
    EXPECT_THROW_WITH(fabric::read_checkpoint(path), {path});
    EXPECT_THROW_WITH(fabric::read_checkpoint(path, fabric::ReadMode::kMapped), {path});
  }
}

// Hundreds of damaged files (truncated anywhere, bytes flipped, the pickle
// overwritten with junk, a zip of something else, a huge claimed length): each
// read either succeeds (a flipped byte inside tensor data is just a value) or
// throws an error naming the path; none crashes or hangs. Both readers are
// exercised: our own file and Python's OrderedDict state dict.
TEST(Checkpoint, DamagedFilesEndInAnErrorNamingThePath) {
  const std::string d = dir() + "/damaged";
  fabric::fs::make_directories(d);
  const std::string ours = d + "/ours.pt";
  auto model = std::make_shared<MlpImpl>();
  fabric::save_checkpoint(ours, {{"model", model}, {"step", 5}, {"name", "run"}});
  const std::string python_file = d + "/python.pt";
  auto python = testutil::run_command(
      testutil::python() + " -c \"import torch, collections; torch.save(collections.OrderedDict("
      "w=torch.ones(3, 4), b=torch.arange(5), n=collections.OrderedDict(x=1.5)), '" + python_file + "')\"");
  ASSERT_EQ(python.status, 0) << python.output;
  std::mt19937 rng(1234);
  int errors = 0, reads = 0;
  for (const auto& source : {ours, python_file}) {
    const auto original = read_bytes(source);
    ASSERT_GT(original.size(), 100u);
    for (int trial = 0; trial < 150; ++trial) {
      auto bytes = original;
      switch (trial % 5) {
        case 0:  // truncated at a random point
          bytes.resize(rng() % bytes.size());
          break;
        case 1:  // a few random bytes flipped
          for (int k = 0; k < 1 + static_cast<int>(rng() % 8); ++k) bytes[rng() % bytes.size()] ^= static_cast<char>(1 + rng() % 255);
          break;
        case 2: {  // a run of junk somewhere
          const size_t at = rng() % bytes.size();
          for (size_t k = at; k < std::min(bytes.size(), at + 64); ++k) bytes[k] = static_cast<char>(rng());
          break;
        }
        case 3: {  // a large length claimed inside the archive
          const size_t at = rng() % (bytes.size() - 4);
          const uint32_t huge = 0x7fffffffu;
          std::memcpy(&bytes[at], &huge, 4);
          break;
        }
        case 4:  // the zip magic followed by junk
          for (size_t k = 2; k < bytes.size(); ++k) bytes[k] = static_cast<char>(rng());
          break;
      }
      const std::string path = d + "/case_" + std::to_string(trial) + ".pt";
      std::ofstream(path, std::ios::binary | std::ios::trunc)
          .write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
      try {
        fabric::read_checkpoint(path);
        ++reads;
      } catch (const std::exception& e) {
        ++errors;
        EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
      }
    }
  }
  EXPECT_GT(errors, 200) << reads << " damaged files read without an error";
}

TEST(Checkpoint, LoadRawReadsABareStateDict) {
  torch::manual_seed(4);
  auto source = std::make_shared<MlpImpl>();
  const std::string path = dir() + "/raw.pt";
  fabric::atomic_write(path, fabric::serialize(fabric::module_state_dict(*source)));
  fabric::Fabric fabric({.accelerator = "cpu"});
  auto target = std::make_shared<MlpImpl>();
  auto net = fabric.setup(target);
  fabric.load_raw(path, net);
  expect_same_params(*source, *target);
}

// A save onto a full disk (the temporary file is made to be /dev/full, whose
// writes fail with ENOSPC) ends in an exception naming the path and the OS
// error, leaves no temporary file and keeps the earlier checkpoint; it used to
// terminate the program from the archive writer's destructor.
TEST(Checkpoint, AFullDiskFailsTheSaveCleanly) {
  const std::string path = dir() + "/full_disk.pt";
  auto small = torch::arange(10, torch::kFloat);
  fabric::save_checkpoint(path, {{"weights", small}});
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  fabric::Fabric fabric({.accelerator = "cpu"});
  fabric.launch();
  for (int attempt = 0; attempt < 2; ++attempt) {
    SCOPED_TRACE(attempt == 0 ? "save_checkpoint" : "fabric.save");
    ::unlink(tmp.c_str());
    ASSERT_EQ(::symlink("/dev/full", tmp.c_str()), 0);
    const fabric::State bigger{{"weights", torch::ones({100000})}, {"step", 3}};
    if (attempt == 0) {
      EXPECT_THROW_WITH(fabric::save_checkpoint(path, bigger), "No space left on device", path);
    } else {
      EXPECT_THROW_WITH(fabric.save(path, bigger), "No space left on device", path);
    }
    struct stat info {};
    EXPECT_NE(::lstat(tmp.c_str(), &info), 0) << "temporary file left behind";
    fabric::State state{{"weights", at::Tensor()}};
    ASSERT_NO_THROW(fabric::load_checkpoint(path, state));
    EXPECT_TRUE(torch::equal(state.at("weights").to_tensor(), small));
  }
}

TEST(Checkpoint, SigkillMidSaveLeavesThePreviousCheckpoint) {
  const std::string path = dir() + "/atomic.pt";
  auto small = torch::arange(10, torch::kFloat);
  fabric::save_checkpoint(path, {{"weights", small}});
  // A child saves a large checkpoint over and over; it is killed mid-write.
  auto big = torch::ones({64, 1024, 1024});  // 256 MiB, made before fork
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    for (;;) fabric::save_checkpoint(path, {{"weights", big}});
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(700));
  ::kill(child, SIGKILL);
  int status = 0;
  ::waitpid(child, &status, 0);
  ASSERT_TRUE(WIFSIGNALED(status));
  // Whatever the child got to, the target is a complete checkpoint.
  fabric::State state{{"weights", at::Tensor()}};
  ASSERT_NO_THROW(fabric::load_checkpoint(path, state));
  auto loaded = state.at("weights").to_tensor();
  EXPECT_TRUE(torch::equal(loaded, small) || torch::equal(loaded, big));
  ::unlink((path + ".tmp." + std::to_string(child)).c_str());
}

TEST(Checkpoint, PythonContinuesEveryOptimizerFromOurCheckpoint) {
  // For each optimizer: 2 steps in C++, save; then C++'s 3rd step is the
  // reference for Python, which loads model and optimizer state into the
  // matching torch.optim class and takes that 3rd step itself.
  using Factory = std::function<std::shared_ptr<torch::optim::Optimizer>(std::vector<torch::Tensor>)>;
  const std::vector<std::tuple<std::string, std::string, Factory>> kinds = {
      {"sgd", "torch.optim.SGD(m.parameters(), lr=1.0)",
       [](auto p) { return std::make_shared<torch::optim::SGD>(p, torch::optim::SGDOptions(0.05).momentum(0.9).nesterov(true)); }},
      {"adam", "torch.optim.Adam(m.parameters())",
       [](auto p) { return std::make_shared<torch::optim::Adam>(p, torch::optim::AdamOptions(0.01).amsgrad(true).weight_decay(0.01)); }},
      {"adamw", "torch.optim.AdamW(m.parameters())",
       [](auto p) { return std::make_shared<torch::optim::AdamW>(p, torch::optim::AdamWOptions(0.01).weight_decay(0.1)); }},
      {"rmsprop", "torch.optim.RMSprop(m.parameters())",
       [](auto p) { return std::make_shared<torch::optim::RMSprop>(p, torch::optim::RMSpropOptions(0.01).momentum(0.5).centered(true)); }},
      {"adagrad", "torch.optim.Adagrad(m.parameters())",
       [](auto p) { return std::make_shared<torch::optim::Adagrad>(p, torch::optim::AdagradOptions(0.05).lr_decay(0.01)); }},
  };
  std::string checks;
  for (const auto& [name, python_ctor, make] : kinds) {
    torch::manual_seed(7);
    auto model = std::make_shared<MlpImpl>();
    auto optimizer = make(model->parameters());
    auto x = torch::randn({6, 5}), y = torch::randn({6, 3});
    auto step = [&] {
      optimizer->zero_grad();
      torch::mse_loss(model->forward(x), y).backward();
      optimizer->step();
    };
    step();
    step();
    const std::string ckpt = dir() + "/opt_" + name + ".pt";
    fabric::save_checkpoint(ckpt, {{"model", model}, {"optimizer", optimizer}, {"x", x}, {"y", y}});
    step();
    fabric::save_checkpoint(dir() + "/opt_" + name + "_next.pt", {{"model", model}});
    // The C++ file round-trips into a fresh C++ optimizer of the same kind too.
    auto model2 = std::make_shared<MlpImpl>();
    auto optimizer2 = make(model2->parameters());
    fabric::State state{{"model", model2}, {"optimizer", optimizer2}};
    fabric::load_checkpoint(ckpt, state);
    optimizer2->zero_grad();
    torch::mse_loss(model2->forward(x), y).backward();
    optimizer2->step();
    expect_same_params(*model, *model2);
    checks += "check('" + name + "', lambda m: " + python_ctor + ")\n";
  }
  const std::string script =
      "import torch\n"
      + kPythonMlp +
      "def check(name, make):\n"
      "    c = torch.load('" + dir() + "/opt_' + name + '.pt')\n"
      "    nxt = torch.load('" + dir() + "/opt_' + name + '_next.pt')['model']\n"
      "    m = Mlp(); m.load_state_dict(c['model'])\n"
      "    opt = make(m); opt.load_state_dict(c['optimizer'])\n"
      "    opt.zero_grad(); torch.nn.functional.mse_loss(m(c['x']), c['y']).backward(); opt.step()\n"
      "    for k, v in m.state_dict().items():\n"
      "        assert torch.allclose(v, nxt[k], atol=1e-6, rtol=1e-5), (name, k, (v - nxt[k]).abs().max())\n"
      "    print(name, 'ok')\n" + checks;
  const auto output = run_python("optimizers", script);
  for (const auto& [name, python_ctor, make] : kinds) {
    EXPECT_NE(output.find(name + " ok"), std::string::npos) << output;
  }
}

// Python Lightning Fabric and torchfabric hand a run to each other mid-training:
// Lightning's fabric.save after 3 steps loads with fabric.load here and 3 more
// steps equal Lightning's own next 3 (1e-6); and the other way, Lightning's
// fabric.load of our file continues exactly as we do. SGD with momentum, Adam, AdamW.
TEST(Checkpoint, LightningFabricCheckpointsBothWays) {
  const std::string d = dir() + "/lightning";
  fabric::fs::make_directories(d);
  const std::string common =
      "import sys, torch\n"
      "from lightning.fabric import Fabric\n" + kPythonMlp +
      "d = '" + d + "'\n"
      + kPythonOptimizers +
      "fabric = Fabric(accelerator='cpu', devices=1)\n"
      "data = torch.load(d + '/data.pt')\n"
      "def steps(m, opt, n):\n"
      "    for _ in range(n):\n"
      "        opt.zero_grad(); fabric.backward(torch.nn.functional.mse_loss(m(data['x']), data['y'])); opt.step()\n";
  torch::manual_seed(3);
  const auto x = torch::randn({6, 5}), y = torch::randn({6, 3});
  fabric::save_checkpoint(d + "/data.pt", {{"x", x}, {"y", y}});
  const std::vector<std::string> names = {"sgd", "adam", "adamw"};
  fabric::Fabric fabric({.accelerator = "cpu"});
  fabric.launch();
  auto steps = [&](auto& net, auto& opt, int n) {
    for (int i = 0; i < n; ++i) {
      opt.zero_grad();
      fabric.backward(torch::mse_loss(net(x), y));
      opt.step();
    }
  };

  // Lightning -> torchfabric.
  const auto lightning = run_python("lightning_save", common +
      "for name in ('sgd', 'adam', 'adamw'):\n"
      "    torch.manual_seed(1)\n"
      "    model = Mlp(); optimizer = make(name, model)\n"
      "    m, opt = fabric.setup(model, optimizer)\n"
      "    steps(m, opt, 3)\n"
      "    fabric.save(d + '/lt_' + name + '.pt', {'model': m, 'optimizer': opt, 'step': 3})\n"
      "    steps(m, opt, 3)\n"
      "    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, d + '/lt_' + name + '_after.pt')\n"
      "print('lightning saved')\n");
  ASSERT_NE(lightning.find("lightning saved"), std::string::npos) << lightning;
  for (const auto& name : names) {
    SCOPED_TRACE("lightning -> torchfabric, " + name);
    auto model = std::make_shared<MlpImpl>();
    auto [net, opt] = fabric.setup(model, make_optimizer(name, model->parameters()));
    fabric::State state{{"model", net}, {"optimizer", opt}, {"step", 0}};
    fabric.load(d + "/lt_" + name + ".pt", state);
    EXPECT_EQ(state.at("step").to_int(), 3);
    steps(net, opt, 3);
    const auto after = fabric::read_checkpoint(d + "/lt_" + name + "_after.pt").toGenericDict();
    for (const auto& item : model->named_parameters()) {
      const auto expected = after.at(item.key()).toTensor();
      EXPECT_TRUE(torch::allclose(item.value(), expected, 1e-6, 1e-6))
          << item.key() << " max diff " << (item.value() - expected).abs().max().item<double>();
    }
  }

  // torchfabric -> Lightning.
  for (const auto& name : names) {
    torch::manual_seed(2);
    auto model = std::make_shared<MlpImpl>();
    auto [net, opt] = fabric.setup(model, make_optimizer(name, model->parameters()));
    steps(net, opt, 3);
    fabric.save(d + "/tf_" + name + ".pt", {{"model", net}, {"optimizer", opt}, {"step", 3}});
    steps(net, opt, 3);
    fabric::save_checkpoint(d + "/tf_" + name + "_after.pt", {{"model", model}});
  }
  const auto back = run_python("lightning_load", common +
      "for name in ('sgd', 'adam', 'adamw'):\n"
      "    model = Mlp(); optimizer = make(name, model)\n"
      "    m, opt = fabric.setup(model, optimizer)\n"
      "    rest = fabric.load(d + '/tf_' + name + '.pt', {'model': m, 'optimizer': opt})\n"
      "    assert rest['step'] == 3, rest\n"
      "    steps(m, opt, 3)\n"
      "    after = torch.load(d + '/tf_' + name + '_after.pt')['model']\n"
      "    for k, v in model.state_dict().items():\n"
      "        assert torch.allclose(v, after[k], atol=1e-6, rtol=1e-6), (name, k, (v - after[k]).abs().max())\n"
      "    print(name, 'continues ok')\n");
  for (const auto& name : names) {
    EXPECT_NE(back.find(name + " continues ok"), std::string::npos) << back;
  }
}

// A checkpoint from a GPU machine: every storage carries the location tag
// "cuda:0". It must load on a machine without a GPU (onto the CPU, then into the
// module's and optimizer's own tensors), as Lightning's map_location="cpu" does.
TEST(Checkpoint, FileWrittenOnAGpuMachineLoadsOnTheCpu) {
  const std::string tagged = dir() + "/from_gpu.pt", plain = dir() + "/from_cpu.pt";
  const std::string script =
      "import torch, torch.serialization as ser\n"
      "torch.manual_seed(0)\n"
      + kPythonMlp +
      "m = Mlp()\n"
      "opt = torch.optim.Adam(m.parameters(), lr=0.01)\n"
      "x = torch.randn(4, 5)\n"
      "opt.zero_grad(); m(x).sum().backward(); opt.step()\n"
      "ckpt = {'model': dict(m.state_dict()), 'optimizer': opt.state_dict(), 'epoch': 3,\n"
      "        'rng': {'torch': torch.get_rng_state(), 'torch.cuda': []}}\n"
      "torch.save(ckpt, '" + plain + "')\n"
      "original = ser.location_tag\n"
      "ser.location_tag = lambda storage: 'cuda:0'  # what a GPU machine writes\n"
      "torch.save(ckpt, '" + tagged + "')\n"
      "ser.location_tag = original\n"
      "print('python ok')\n";
  ASSERT_NE(run_python("save_cuda_tagged", script).find("python ok"), std::string::npos);
  const auto bytes = read_bytes(tagged);
  ASSERT_NE(std::string(bytes.begin(), bytes.end()).find("cuda:0"), std::string::npos)
      << "the file does not carry CUDA location tags; the test would prove nothing";

  auto load = [](const std::string& path) {
    fabric::Fabric fabric({.accelerator = "cpu"});
    auto model = std::make_shared<MlpImpl>();
    auto adam = std::make_shared<torch::optim::Adam>(model->parameters(), 1e-3);
    auto [net, opt] = fabric.setup(model, adam);
    fabric::State state{{"model", net}, {"optimizer", opt}, {"epoch", 0}, {"rng", fabric::RngState()}};
    fabric.load(path, state);
    EXPECT_EQ(state.at("epoch").to_int(), 3);
    return std::make_pair(model, adam);
  };
  auto [from_gpu, adam_gpu] = load(tagged);
  auto [from_cpu, adam_cpu] = load(plain);
  for (const auto& p : from_gpu->parameters()) EXPECT_TRUE(p.device().is_cpu());
  expect_same_params(*from_gpu, *from_cpu);
  expect_same_adam_state(*adam_gpu, *adam_cpu);
}

// RNG state uses Lightning's keys: "torch" for the CPU generator, "torch.cuda"
// for the CUDA generators (ours were ignored by Lightning under "cuda").
TEST(Checkpoint, RngStateUsesLightningKeys) {
  auto dict = fabric::RngState::capture().to_ivalue().toGenericDict();
  EXPECT_TRUE(dict.contains("torch"));
  EXPECT_TRUE(dict.contains("torch.cuda"));
  EXPECT_FALSE(dict.contains("cuda"));
  // Both spellings read back.
  for (const char* key : {"torch.cuda", "cuda"}) {
    c10::impl::GenericDict file(c10::StringType::get(), c10::AnyType::get());
    file.insert("torch", dict.at("torch"));
    file.insert(key, c10::impl::GenericList(c10::AnyType::get()));
    EXPECT_TRUE(torch::equal(fabric::RngState::from_ivalue(file).cpu, dict.at("torch").toTensor()));
  }
}

namespace {

// An optimizer LibTorch does not have (sign of an EMA of gradients), to show that
// a new optimizer type needs exactly one codec.
struct SignMomentumOptions
    : torch::optim::OptimizerCloneableOptions<SignMomentumOptions> {
  TORCH_ARG(double, lr) = 0.01;
  TORCH_ARG(double, beta) = 0.9;
  double get_lr() const override { return lr(); }
  void set_lr(const double lr) override { this->lr(lr); }
};
struct SignMomentumState
    : torch::optim::OptimizerCloneableParamState<SignMomentumState> {
  TORCH_ARG(torch::Tensor, average);
};
class SignMomentum : public torch::optim::Optimizer {
 public:
  SignMomentum(std::vector<torch::Tensor> params, SignMomentumOptions options)
      : Optimizer({torch::optim::OptimizerParamGroup(std::move(params))},
                  std::make_unique<SignMomentumOptions>(options)) {}
  torch::Tensor step(LossClosure = nullptr) override {
    torch::NoGradGuard no_grad;
    for (auto& group : param_groups_) {
      const auto& o = static_cast<const SignMomentumOptions&>(group.options());
      for (auto& p : group.params()) {
        if (!p.grad().defined()) continue;
        auto& slot = state_[p.unsafeGetTensorImpl()];
        if (!slot) slot = std::make_unique<SignMomentumState>();
        auto& s = static_cast<SignMomentumState&>(*slot);
        if (!s.average().defined()) s.average(torch::zeros_like(p));
        s.average().mul_(o.beta()).add_(p.grad(), 1 - o.beta());
        p.add_(s.average().sign(), -o.lr());
      }
    }
    return {};
  }
};

class SignMomentumCodec final : public fabric::optim::OptimizerCodec {
 public:
  std::string name() const override { return "SignMomentum"; }
  bool handles(const torch::optim::OptimizerOptions& o) const override {
    return dynamic_cast<const SignMomentumOptions*>(&o) != nullptr;
  }
  void save_group(const torch::optim::OptimizerOptions& o,
                  fabric::optim::GenericDict& out) const override {
    const auto& options = static_cast<const SignMomentumOptions&>(o);
    out.insert("lr", options.lr());
    out.insert("beta", options.beta());
  }
  void load_group(const fabric::optim::GroupEntry& in,
                  torch::optim::OptimizerOptions& o) const override {
    static_cast<SignMomentumOptions&>(o).lr(in.number("lr")).beta(in.number("beta"));
  }
  void save_state(const torch::optim::OptimizerParamState& s,
                  fabric::optim::GenericDict& out) const override {
    out.insert("average", static_cast<const SignMomentumState&>(s).average());
  }
  std::unique_ptr<torch::optim::OptimizerParamState> load_state(
      const fabric::optim::StateEntry& in) const override {
    auto s = std::make_unique<SignMomentumState>();
    s->average(in.tensor("average"));
    return s;
  }
  std::vector<at::Tensor*> per_element_state(torch::optim::OptimizerParamState& s) const override {
    return {&static_cast<SignMomentumState&>(s).average()};
  }
};

}  // namespace

// A new optimizer type: without a codec its save fails naming the optimizers
// that have one; with one registered, its state saves, reads in Python under
// Python's names and loads back exactly (hyper-parameters included).
TEST(Checkpoint, ANewOptimizerTypeNeedsOneCodec) {
  torch::manual_seed(6);
  auto model = std::make_shared<MlpImpl>();
  auto optimizer = std::make_shared<SignMomentum>(model->parameters(),
                                                 SignMomentumOptions().lr(0.05).beta(0.8));
  auto x = torch::randn({6, 5});
  auto train = [&](torch::nn::Module& m, torch::optim::Optimizer& o, int steps) {
    for (int i = 0; i < steps; ++i) {
      o.zero_grad();
      static_cast<MlpImpl&>(m).forward(x).pow(2).mean().backward();
      o.step();
    }
  };
  train(*model, *optimizer, 3);
  EXPECT_THROW_WITH(fabric::optimizer_state_dict(*optimizer), "no state-dict codec",
                    "SGD, Adam, AdamW, RMSprop, Adagrad", "register_codec");

  fabric::optim::register_codec(std::make_shared<SignMomentumCodec>());
  EXPECT_NE(fabric::optim::codec_names().find("SignMomentum"), std::string::npos);
  const std::string path = dir() + "/sign_momentum.pt";
  fabric::State state{{"model", model}, {"optimizer", optimizer}};
  fabric::save_checkpoint(path, state);

  auto copy = std::make_shared<MlpImpl>();
  auto resumed = std::make_shared<SignMomentum>(copy->parameters(),
                                               SignMomentumOptions().lr(1).beta(0));
  fabric::State into{{"model", copy}, {"optimizer", resumed}};
  fabric::load_checkpoint(path, into);
  const auto& o = static_cast<const SignMomentumOptions&>(resumed->param_groups()[0].options());
  EXPECT_EQ(o.lr(), 0.05);
  EXPECT_EQ(o.beta(), 0.8);
  train(*model, *optimizer, 2);
  train(*copy, *resumed, 2);
  expect_same_params(*model, *copy);

  const auto out = run_python("sign_momentum",
                              "import torch\n"
                              "sd = torch.load('" + path + "')['optimizer']\n"
                              "g = sd['param_groups'][0]\n"
                              "print('group', g['lr'], g['beta'], g['params'])\n"
                              "print('state', sorted(sd['state'][0].keys()), "
                              "tuple(sd['state'][3]['average'].shape))\n");
  EXPECT_NE(out.find("group 0.05 0.8 [0, 1, 2, 3]"), std::string::npos) << out;
  EXPECT_NE(out.find("state ['average'] (3,)"), std::string::npos) << out;
}

// Lightning Fabric under DDP (2 CPU processes over Gloo, each on half the batch)
// saves after 3 steps; the file loads here and 3 steps on the whole batch in one
// process (what DDP's averaged gradient equals) end where Lightning's ranks did.
TEST(Checkpoint, LightningFabricDdpCheckpointContinuesInOneProcess) {
  const std::string d = dir() + "/lightning_ddp";
  fabric::fs::make_directories(d);
  torch::manual_seed(3);
  const auto x = torch::randn({6, 5}), y = torch::randn({6, 3});
  fabric::save_checkpoint(d + "/data.pt", {{"x", x}, {"y", y}});
  const std::string script = d + "/ddp.py";
  std::ofstream(script) <<
      "import torch\n"
      "from lightning.fabric import Fabric\n" + kPythonMlp + kPythonOptimizers +
      "d = '" + d + "'\n"
      "fabric = Fabric(accelerator='cpu', devices=2, strategy='ddp')\n"
      "fabric.launch()\n"
      "data = torch.load(d + '/data.pt')\n"
      "r = fabric.global_rank\n"
      "x, y = data['x'][3 * r:3 * r + 3], data['y'][3 * r:3 * r + 3]\n"
      "for name in ('sgd', 'adam', 'adamw'):\n"
      "    torch.manual_seed(1)\n"
      "    model = Mlp()\n"
      "    m, opt = fabric.setup(model, make(name, model))\n"
      "    def steps(n):\n"
      "        for _ in range(n):\n"
      "            opt.zero_grad(); fabric.backward(torch.nn.functional.mse_loss(m(x), y)); opt.step()\n"
      "    steps(3)\n"
      "    fabric.save(d + '/' + name + '.pt', {'model': m, 'optimizer': opt, 'step': 3})\n"
      "    steps(3)\n"
      "    if r == 0:\n"
      "        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, d + '/' + name + '_after.pt')\n"
      "fabric.barrier()\n"
      "if r == 0: print('rank', r, 'saved', flush=True)  # one rank: lines would interleave\n";
  const auto port = std::to_string(20000 + ::getpid() % 20000);
  const auto result = testutil::run_command("MASTER_PORT=" + port + " " + testutil::python() +
                                            " " + script);
  ASSERT_EQ(result.status, 0) << result.output;
  ASSERT_NE(result.output.find("rank 0 saved"), std::string::npos) << result.output;

  fabric::Fabric fabric({.accelerator = "cpu"});
  fabric.launch();
  for (const std::string name : {"sgd", "adam", "adamw"}) {
    SCOPED_TRACE("lightning ddp -> torchfabric, " + name);
    auto model = std::make_shared<MlpImpl>();
    auto [net, opt] = fabric.setup(model, make_optimizer(name, model->parameters()));
    fabric::State state{{"model", net}, {"optimizer", opt}, {"step", 0}};
    fabric.load(d + "/" + name + ".pt", state);
    EXPECT_EQ(state.at("step").to_int(), 3);
    for (int i = 0; i < 3; ++i) {
      opt.zero_grad();
      fabric.backward(torch::mse_loss(net(x), y));
      opt.step();
    }
    const auto after = fabric::read_checkpoint(d + "/" + name + "_after.pt").toGenericDict();
    for (const auto& item : model->named_parameters()) {
      const auto expected = after.at(item.key()).toTensor();
      EXPECT_TRUE(torch::allclose(item.value(), expected, 1e-6, 1e-6))
          << item.key() << " max diff " << (item.value() - expected).abs().max().item<double>();
    }
  }
}

// Forged sizes (a pickle string claiming 1 TiB or 3.75 GiB, a storage claiming
// 10^12 elements, tensors of 10^12 or 10^6 x 10^6 elements or with sizes and
// strides whose extent overflows, over a 6-element storage, zip records
// claiming 1 TiB or 3 GiB) end in an error naming the path, and reading them
// stays within a small memory bound: each is read in a child process whose
// address space may grow by at most 1 GiB, and whose peak resident memory is
// measured (VmHWM after resetting it through /proc/self/clear_refs).
TEST(Checkpoint, ForgedSizesDoNotAllocateWhatTheyClaim) {
  const std::string d = dir() + "/forged";
  fabric::fs::make_directories(d);
  const auto made = run_python("forge",
      "import io, struct, zipfile, torch\n"
      "d = '" + d + "'\n"
      "def archive(path, pkl, records):\n"
      "    with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as z:\n"
      "        z.writestr('archive/data.pkl', pkl)\n"
      "        z.writestr('archive/byteorder', 'little')\n"
      "        for name, data in records.items(): z.writestr('archive/data/' + name, data)\n"
      "        z.writestr('archive/version', '3\\n')\n"
      "# a dict {'k': <string of the claimed length>}\n"
      "head = b'\\x80\\x02}q\\x00X\\x01\\x00\\x00\\x00k'\n"
      "archive(d + '/unicode8.pt', b'\\x80\\x04}\\x8c\\x01k\\x8d' + struct.pack('<Q', 1 << 40) + b'abc', {})\n"
      "archive(d + '/unicode4.pt', head + b'X' + struct.pack('<I', 0xF0000000) + b'abc', {})\n"
      "# a real tensor file, then its pickle edited: storage numel and tensor sizes\n"
      "buf = io.BytesIO(); torch.save({'w': torch.arange(6, dtype=torch.float32)}, buf)\n"
      "z = zipfile.ZipFile(io.BytesIO(buf.getvalue()))\n"
      "prefix = z.namelist()[0].split('/')[0]\n"
      "pkl = z.read(prefix + '/data.pkl'); data = z.read(prefix + '/data/0')\n"
      "assert b'K\\x06' in pkl, pkl\n"
      "assert b'K\\x06t' in pkl, pkl\n"
      "tera = b'\\x8a\\x06\\x00\\x10\\xa5\\xd4\\xe8\\x00'  # LONG1 10**12\n"
      "archive(d + '/numel.pt', pkl.replace(b'K\\x06t', tera + b't', 1), {'0': data})\n"
      "archive(d + '/size.pt', pkl.replace(b'K\\x06\\x85', tera + b'\\x85', 1), {'0': data})\n"
      "big = b'\\x8a\\x08' + (1 << 62).to_bytes(8, 'little')\n"
      "archive(d + '/overflow.pt', pkl.replace(b'K\\x06\\x85', big + b'K\\x04\\x86', 1).replace(b'K\\x01\\x85', b'K\\x04' + big + b'\\x86', 1), {'0': data})\n"
      "archive(d + '/sizes.pt', pkl.replace(b'K\\x06\\x85', b'J\\x40\\x42\\x0f\\x00J\\x40\\x42\\x0f\\x00\\x86', 1).replace(b'K\\x01\\x85', b'J\\x40\\x42\\x0f\\x00K\\x01\\x86', 1), {'0': data})\n"
      "# zip records claiming more than the file holds (central directory and local header)\n"
      "for name, claim in (('record1t', 1 << 40), ('record3g', 3 << 30)):\n"
      "    archive(d + '/' + name + '.pt', pkl, {'0': data})\n"
      "    raw = bytearray(open(d + '/' + name + '.pt', 'rb').read())\n"
      "    entry = b'archive/data/0'\n"
      "    size = min(claim, 0xFFFFFFFE)\n"
      "    at = raw.find(b'PK\\x03\\x04' + b'\\x14\\x00')\n"
      "    while at >= 0:\n"
      "        if raw[at + 30:at + 30 + len(entry)] == entry: struct.pack_into('<II', raw, at + 18, size, size)\n"
      "        at = raw.find(b'PK\\x03\\x04', at + 4)\n"
      "    at = raw.find(b'PK\\x01\\x02')\n"
      "    while at >= 0:\n"
      "        if raw[at + 46:at + 46 + len(entry)] == entry: struct.pack_into('<II', raw, at + 20, size, size)\n"
      "        at = raw.find(b'PK\\x01\\x02', at + 4)\n"
      "    open(d + '/' + name + '.pt', 'wb').write(bytes(raw))\n"
      "print('forged')\n");
  ASSERT_NE(made.find("forged"), std::string::npos) << made;

  for (const std::string name :
       {"unicode8", "unicode4", "numel", "size", "sizes", "overflow", "record1t", "record3g"}) {
    SCOPED_TRACE(name);
    const std::string path = d + "/" + name + ".pt";
    size_t virtual_pages = 0;
    std::ifstream("/proc/self/statm") >> virtual_pages;
    int pipe_fds[2];
    ASSERT_EQ(::pipe(pipe_fds), 0);
    const pid_t child = ::fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
      ::close(pipe_fds[0]);
      rlimit limit{};
      ::getrlimit(RLIMIT_AS, &limit);
      limit.rlim_cur = virtual_pages * ::sysconf(_SC_PAGESIZE) + (size_t{1} << 30);
      ::setrlimit(RLIMIT_AS, &limit);
      // Peak resident memory of this child from here on: reset the high-water
      // mark, read, then compare it with where it started.
      auto status_kib = [](const std::string& field) {
        std::ifstream in("/proc/self/status");
        for (std::string line; std::getline(in, line);) {
          if (line.rfind(field + ":", 0) == 0) return std::stol(line.substr(field.size() + 1));
        }
        return -1L;
      };
      std::ofstream("/proc/self/clear_refs") << "5";
      const long before = status_kib("VmRSS");
      std::string message = "read without an error";
      try {
        fabric::read_checkpoint(path);
      } catch (const std::exception& e) {
        message = e.what();
      }
      message = std::to_string(status_kib("VmHWM") - before) + " " + message;
      (void)!::write(pipe_fds[1], message.data(), message.size());
      ::_exit(0);
    }
    ::close(pipe_fds[1]);
    std::string message;
    char buffer[4096];
    for (ssize_t n; (n = ::read(pipe_fds[0], buffer, sizeof buffer)) > 0;) message.append(buffer, n);
    ::close(pipe_fds[0]);
    int status = 0;
    ASSERT_EQ(::waitpid(child, &status, 0), child);
    EXPECT_TRUE(WIFEXITED(status)) << "the reader crashed on " << path;
    const auto space = message.find(' ');
    ASSERT_NE(space, std::string::npos) << message;
    const long grew_kib = std::stol(message.substr(0, space));
    message = message.substr(space + 1);
    EXPECT_NE(message.find(path), std::string::npos) << message;
    for (const char* allocation_failure : {"not enough memory", "bad_alloc", "allocate"}) {
      EXPECT_EQ(message.find(allocation_failure), std::string::npos)
          << "the reader tried to allocate what the file claims: " << message;
    }
    std::cout << name << ": " << message.substr(0, 300) << "\n"
              << name << ": resident memory grew by " << grew_kib << " KiB while reading\n";
    EXPECT_GE(grew_kib, 0);
    EXPECT_LT(grew_kib, 256 * 1024);  // far below any claim
  }
}

// As Lightning's checkpoint IO does, a save creates missing parent directories.
TEST(Checkpoint, SaveCreatesMissingParentDirectories) {
  fabric::Fabric fabric({.accelerator = "cpu"});
  const std::string root = dir() + "/new_parent";
  fabric::fs::remove_all(root);
  const std::string path = root + "/a/b/w.pt";
  fabric.save(path, {{"w", torch::arange(4)}});
  fabric::State state{{"w", torch::zeros({4}, torch::kLong)}};
  fabric.load(path, state);
  EXPECT_TRUE(torch::equal(state.at("w").to_tensor(), torch::arange(4)));
}
