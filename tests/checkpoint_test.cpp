// Checkpoints, our own semantics: round trips, exact resume, strict loads that
// change nothing when they fail, atomic writes under SIGKILL and a full disk,
// RNG state under Lightning's keys, a new optimizer type with one codec, and
// every error by message.
#include "checkpoint_test_util.h"

using namespace checkpoint_test;

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
