// Checkpoints between C++ and Python: torch.load of our files (same tensors,
// same outputs), our loading of what torch.save and Lightning Fabric really
// write (OrderedDicts, Python objects, every dtype, files from GPU machines),
// and training continued on the other side with the same next steps.
#include "checkpoint_test_util.h"

using namespace checkpoint_test;

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
  const auto result = testutil::run_command("MASTER_PORT=" + testutil::lightning_port() + " " + testutil::python() +
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
