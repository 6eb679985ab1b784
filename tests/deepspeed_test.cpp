// strategy="deepspeed" (ZeRO stages 1-3, torchfabric's implementation) on the
// CPU with 2 ranks (Open MPI), through tests/fsdp_worker: the FsdpNet, whose
// parameters straddle the ranks' slices and one of which has no elements on
// rank 0. Every variant is compared with one process on the concatenated batch
// (1e-5), or with plain LibTorch computing what the variant promises.
#include <gtest/gtest.h>

#include <fstream>
#include <map>

#include "accelerators/accelerator.h"
#include "checkpoint/checkpoint.h"
#include "checkpoint/filesystem.h"
#include "fsdp_model.h"
#include "fsdp_reference.h"
#include "mpi_test_util.h"
#include "test_util.h"

extern std::string g_consolidate;  // set by main() in ddp_test.cpp

namespace {

using namespace fsdp_reference;

std::string run_ds(const std::string& name, const std::string& mode, const std::string& flags, int ranks = 2) {
  return run_fsdp_worker("deepspeed_" + name, mode, flags, ranks);
}

std::string write_config(const std::string& name, const std::string& json) {
  const std::string path = ::testing::TempDir() + "/deepspeed_" + name + ".json";
  std::ofstream(path) << json;
  return path;
}

}  // namespace

TEST(DeepSpeed, EachStageEqualsOneProcessForSgdMomentumAdamAndAdamW) {
  for (const char* optimizer : {"sgd", "adam", "adamw"}) {
    const auto reference = one_process(optimizer).params;
    for (const char* stage : {"1", "2", "3"}) {
      SCOPED_TRACE(std::string(optimizer) + " at stage " + stage);
      expect_close(reference, run_ds(std::string("stage") + stage + "_" + optimizer, "train",
                                     std::string("--strategy deepspeed_stage_") + stage +
                                         " --optimizer " + optimizer));
    }
  }
  // Small buckets (10 elements): many buckets, parameters split across them.
  const auto reference = one_process("adam").params;
  for (const char* stage : {"1", "2"}) {
    SCOPED_TRACE(std::string("10-element buckets at stage ") + stage);
    expect_close(reference, run_ds(std::string("small_buckets") + stage, "train",
                                   std::string("--strategy deepspeed_stage_") + stage + " --bucket-size 10"));
  }
  // "deepspeed" is stage 2; a frozen block between trainable ones.
  expect_close(reference, run_ds("plain_name", "train", "--strategy deepspeed"));
  expect_close(one_process("adam", false, 0, {"b0", "b2"}).params,
               run_ds("frozen", "train", "--strategy deepspeed_stage_2 --freeze b0,b2"));
}

// fabric.clip_gradients returns the norm over every rank's pieces (the one-process
// norm), and the config's gradient_clipping clips before every step.
TEST(DeepSpeed, ClippingEqualsOneProcess) {
  const auto reference = one_process("sgd", false, 0.05);
  std::vector<torch::Tensor> norms;
  for (double n : reference.norms) norms.push_back(torch::tensor(n));
  for (const char* stage : {"1", "2", "3", "3_offload"}) {
    SCOPED_TRACE(std::string("stage ") + stage);
    const auto dir = run_ds(std::string("clip") + stage, "clip",
                            std::string("--optimizer sgd --strategy deepspeed_stage_") + stage);
    expect_close(reference.params, dir);
    expect_close(norms, dir, 1e-5, "norms");
  }
  const auto config = write_config("clip", R"({"zero_optimization": {"stage": 1}, "gradient_clipping": 0.05})");
  expect_close(reference.params, run_ds("config_clip", "train",
                                        "--optimizer sgd --strategy deepspeed --deepspeed-config " + config));
}

// no_backward_sync micro-batches (full gradients accumulate, the last one
// reduces their sum); two synced micro-batches whose second leaves a unit out
// (its pieces keep the first one's gradient); a loss term on one rank only.
TEST(DeepSpeed, AccumulationAndPartlyUsedParametersEqualOneProcess) {
  const auto reference = one_process("adam").params;
  const auto partial = aux_one_process("accumulate_partial");
  for (const char* stage : {"1", "2"}) {
    SCOPED_TRACE(std::string("stage ") + stage);
    const std::string flag = std::string("--strategy deepspeed_stage_") + stage;
    expect_close(reference, run_ds(std::string("accumulate") + stage, "accumulate", flag));
    expect_close(partial, run_ds(std::string("partial") + stage, "accumulate_partial", flag));
  }
  expect_close(aux_one_process("conditional"), run_ds("conditional", "conditional", "--strategy deepspeed"));
}

// Loss scaling: an inf in one rank's gradient pieces makes every rank skip that
// step with equal scales (the worker checks), and the next step trains.
TEST(DeepSpeed, Fp16InfOnOneRankSkipsTheStepOnEveryRank) {
  for (const char* stage : {"1", "2", "3", "3_offload"}) {
    SCOPED_TRACE(std::string("stage ") + stage);
    run_ds(std::string("inf") + stage, "inf", std::string("--fp16-scaler --strategy deepspeed_stage_") + stage);
  }
}

// Offload in fp32 (stages 1-3): masters and Adam state on the host, the same numbers.
// bf16-true: the model computes in bf16 while the optimizer steps fp32 masters
// with fp32 Adam state; plain LibTorch doing exactly that is the reference (one
// rank, so that the bf16 forward sees the same rows), and it is not what plain
// bf16 training gives (the test can tell the two apart).
TEST(DeepSpeed, OffloadStepsFp32MastersAsPlainLibTorchDoes) {
  const auto reference = one_process("adam").params;
  for (const char* stage : {"1", "2", "3"}) {
    SCOPED_TRACE(std::string("offload at stage ") + stage);
    expect_close(reference, run_ds(std::string("offload") + stage, "train",
                                   std::string("--strategy deepspeed_stage_") + stage + "_offload"));
  }
  // Plain LibTorch: bf16 model, fp32 master copies stepped by fp32 Adam.
  torch::manual_seed(0);
  auto model = std::make_shared<FsdpNetImpl>();
  model->to(torch::kBFloat16);
  std::vector<torch::Tensor> masters;
  for (const auto& p : model->parameters()) masters.push_back(p.detach().to(torch::kFloat).clone());
  torch::optim::Adam adam(masters, 1e-2);
  torch::manual_seed(0);
  auto plain = std::make_shared<FsdpNetImpl>();  // bf16 all the way: what masters avoid
  plain->to(torch::kBFloat16);
  torch::optim::Adam plain_adam(plain->parameters(), 1e-2);
  for (int step = 0; step < 10; ++step) {
    auto [x, y] = fsdp_global_batch(step);
    adam.zero_grad();
    model->zero_grad();
    torch::mse_loss(model->forward(x.to(torch::kBFloat16)).to(torch::kFloat), y).backward();
    auto params = model->parameters();
    for (size_t i = 0; i < params.size(); ++i) masters[i].mutable_grad() = params[i].grad().to(torch::kFloat);
    adam.step();
    {
      torch::NoGradGuard no_grad;
      for (size_t i = 0; i < params.size(); ++i) params[i].copy_(masters[i]);
    }
    plain_adam.zero_grad();
    torch::mse_loss(plain->forward(x.to(torch::kBFloat16)).to(torch::kFloat), y).backward();
    plain_adam.step();
  }
  std::vector<torch::Tensor> expected, plain_params;
  double apart = 0;
  for (const auto& p : model->parameters()) expected.push_back(p.detach().to(torch::kFloat));
  for (const auto& p : plain->parameters()) plain_params.push_back(p.detach().to(torch::kFloat));
  for (size_t i = 0; i < expected.size(); ++i) {
    apart = std::max(apart, (expected[i] - plain_params[i]).abs().max().item<double>());
  }
  ASSERT_GT(apart, 1e-3) << "plain bf16 training gives the masters' result: the test would not tell them apart";
  for (const char* strategy : {"deepspeed_stage_2_offload", "deepspeed_stage_1", "deepspeed_stage_3",
                               "deepspeed_stage_3_offload"}) {
    SCOPED_TRACE(std::string("bf16-true under ") + strategy);
    expect_close(expected, run_ds(std::string("bf16_") + strategy, "train",
                                  std::string("--precision bf16-true --devices 1 --strategy ") + strategy, 1),
                 1e-6, "params", 1);
  }
}

// A full checkpoint at stage 1 is the file DDP writes (the same tensors under
// the same keys), and it resumes under stage 2, stage 3 and fsdp; DDP's file
// resumes under stage 2, and stage 3's sharded (DCP) checkpoint under stages 1 and 2.
// On a GPU (NCCL; skipped without one): each stage, offload included, trains as
// one process does, and a stage-1 file resumes under stage 3 with offload.
TEST(DeepSpeedCuda, NcclStagesAndOffloadMatchOneProcess) {
  const int gpus = static_cast<int>(fabric::cuda_device_count());
  if (gpus == 0) GTEST_SKIP() << "no GPU visible";
  const auto reference = one_process("adam").params;
  const int world = std::min(gpus, 2);
  const std::string flags = " --accelerator cuda --devices " + std::to_string(world);
  for (const char* strategy : {"deepspeed_stage_1", "deepspeed_stage_2_offload", "deepspeed_stage_3",
                               "deepspeed_stage_3_offload"}) {
    SCOPED_TRACE(strategy);
    const std::string dir = ::testing::TempDir() + "/deepspeed_cuda_" + strategy;
    fabric::fs::remove_all(dir);
    fabric::fs::make_directories(dir);
    auto saved = testutil::run_command(g_fsdp_worker + " save " + dir + flags + " --strategy " + strategy);
    ASSERT_EQ(saved.status, 0) << saved.output;
    expect_close(reference, dir, 1e-4, "params", world);
  }
  const std::string resumed = ::testing::TempDir() + "/deepspeed_cuda_resumed";
  fabric::fs::remove_all(resumed);
  fabric::fs::make_directories(resumed);
  auto run = testutil::run_command(g_fsdp_worker + " resume " + resumed + flags +
                                   " --strategy deepspeed_stage_3_offload --from " + ::testing::TempDir() +
                                   "/deepspeed_cuda_deepspeed_stage_1/ckpt");
  ASSERT_EQ(run.status, 0) << run.output;
  expect_close(reference, resumed, 1e-4, "params", world);
}

TEST(DeepSpeed, CheckpointsAreDdpsFilesAndLoadAcrossStrategies) {
  const auto reference = one_process("adam").params;
  const auto stage1 = run_ds("save_stage1", "save", "--strategy deepspeed_stage_1_offload");
  const auto ddp = run_ds("save_ddp", "save", "--strategy ddp");
  std::map<std::string, torch::Tensor> ours, theirs;
  testutil::flatten_tensors(fabric::read_checkpoint(stage1 + "/ckpt"), "", ours);
  testutil::flatten_tensors(fabric::read_checkpoint(ddp + "/ckpt"), "", theirs);
  ASSERT_FALSE(theirs.empty());
  ASSERT_EQ(ours.size(), theirs.size());
  for (const auto& [key, tensor] : theirs) {
    ASSERT_TRUE(ours.count(key)) << key;
    EXPECT_EQ(ours[key].sizes(), tensor.sizes()) << key;
    EXPECT_TRUE(torch::allclose(ours[key], tensor, 1e-6, 1e-6)) << key;
  }
  for (const char* strategy : {"deepspeed_stage_2", "deepspeed_stage_3", "fsdp"}) {
    SCOPED_TRACE(std::string("stage 1's file resumed under ") + strategy);
    expect_close(reference, run_ds(std::string("resume_") + strategy, "resume",
                                   std::string("--strategy ") + strategy + " --from " + stage1 + "/ckpt"));
  }
  expect_close(reference, run_ds("resume_ddp_file", "resume", "--strategy deepspeed_stage_2 --from " + ddp + "/ckpt"));
  // Stage 3 with fp32 masters in host memory: the file, and back.
  expect_close(reference, run_ds("resume_stage3_offload", "resume",
                                 "--strategy deepspeed_stage_3_offload --from " + stage1 + "/ckpt"));
  const auto stage3 = run_ds("save_stage3_offload", "save", "--strategy deepspeed_stage_3_offload");
  expect_close(reference, run_ds("resume_from_stage3", "resume", "--strategy deepspeed_stage_1 --from " + stage3 + "/ckpt"));
  const auto sharded = run_ds("save_dcp", "save", "--strategy deepspeed_stage_3 --state-dict sharded");
  ASSERT_TRUE(fabric::fs::exists(sharded + "/ckpt/.metadata"));
  for (const char* strategy : {"deepspeed_stage_1", "deepspeed_stage_2_offload"}) {
    SCOPED_TRACE(std::string("a DCP checkpoint resumed under ") + strategy);
    expect_close(reference, run_ds(std::string("resume_dcp_") + strategy, "resume",
                                   std::string("--strategy ") + strategy + " --from " + sharded + "/ckpt"));
  }
}

// state_dict_type="sharded" at stages 1-2 (and 3 with fp32 masters): a DCP
// directory whose parameters rank 0 writes whole and whose optimizer state each
// rank writes as its pieces, keyed by the parameters' names. It holds what the
// full file holds (PyTorch's converter reads it), and resumes at stage 2 with
// masters (each rank reads only its pieces), under fsdp and at one rank.
TEST(DeepSpeed, ShardedCheckpointsAtEveryStageResumeAnywhere) {
  const auto reference = one_process("adam").params;
  const auto saved = run_ds("sharded_stage1", "save", "--strategy deepspeed_stage_1 --state-dict sharded");
  const std::string ckpt = saved + "/ckpt";
  ASSERT_TRUE(fabric::fs::exists(ckpt + "/.metadata"));
  expect_close(reference, saved);
  std::map<std::string, torch::Tensor> full, merged;
  testutil::flatten_tensors(fabric::read_checkpoint(saved + "/full.pt"), "", full);
  const std::string consolidated = saved + "/consolidated.pt";
  auto tool = testutil::run_command(g_consolidate + " " + ckpt + " " + consolidated);
  ASSERT_EQ(tool.status, 0) << tool.output;
  testutil::flatten_tensors(fabric::read_checkpoint(consolidated), "", merged);
  ASSERT_FALSE(full.empty());
  ASSERT_EQ(merged.size(), full.size());
  for (const auto& [path, tensor] : full) {
    ASSERT_TRUE(merged.count(path)) << path;
    EXPECT_TRUE(torch::equal(merged[path], tensor)) << path;
  }
  auto convert = testutil::run_command(
      testutil::python() + " -c \"import torch; from torch.distributed.checkpoint.format_utils import "
      "dcp_to_torch_save as f; f('" + ckpt + "', '" + saved + "/by_python.pt'); c = torch.load('" + saved +
      "/by_python.pt'); print('python read', tuple(c['optimizer']['state']['b0.fc.weight']['exp_avg'].shape))\"");
  EXPECT_EQ(convert.status, 0) << convert.output;
  EXPECT_NE(convert.output.find("python read (7, 7)"), std::string::npos) << convert.output;
  expect_close(reference, run_ds("sharded_resume_stage2_offload", "resume",
                                 "--strategy deepspeed_stage_2_offload --state-dict sharded --from " + ckpt));
  expect_close(reference, run_ds("sharded_resume_fsdp", "resume", "--strategy fsdp --from " + ckpt));
  expect_close(reference, run_ds("sharded_resume_one", "resume", "--strategy deepspeed_stage_1 --from " + ckpt, 1),
               1e-5, "params", 1);
  const auto stage3 = run_ds("sharded_stage3_offload", "save",
                             "--strategy deepspeed_stage_3_offload --state-dict sharded");
  expect_close(reference, run_ds("sharded_resume_from_stage3", "resume",
                                 "--strategy deepspeed_stage_3_offload --state-dict sharded --from " + stage3 + "/ckpt"));
}

// Misuse is an error naming the fix, on every rank (no hang): a backward outside
// fabric.backward (the pieces would get no gradient and the step do nothing),
// an optimizer that has stepped already, one over a module not set up.
// (The worker exits 3 when an error is missing or its message lacks the fix.)
TEST(DeepSpeed, MisuseIsAnErrorOnEveryRank) {
  run_ds("errors", "ds_errors", "--strategy deepspeed_stage_2");
}
