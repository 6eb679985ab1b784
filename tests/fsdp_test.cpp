// fsdp with sharding units on the CPU with 2 ranks (Open MPI): a model with three
// fabric::Sharded blocks (one called twice per forward) plus a root, sized so
// that padding appears, a parameter straddles the rank boundary and one has no
// elements on rank 0 (tests/fsdp_model.h). Every variant is compared with one
// process on the concatenated batch (and DDP where the issue asks), and the
// worker checks the memory invariants itself.
#include <gtest/gtest.h>

#include <fcntl.h>
#include <stdio.h>

#include <fstream>
#include <map>
#include <sstream>
#include <iterator>

#include "accelerators/accelerator.h"
#include "checkpoint/checkpoint.h"
#include "checkpoint/filesystem.h"
#include "checkpoint/dcp.h"
#include "fsdp_model.h"
#include "fsdp_reference.h"
#include "mpi_test_util.h"
#include "test_util.h"

std::string g_fsdp_worker, g_consolidate;  // set by main() in ddp_test.cpp

namespace {

using testutil::mpirun;
using testutil::read_tensor_list;
using namespace fsdp_reference;

// Runs the worker under mpirun in a fresh directory; returns the directory.
std::string run_worker(const std::string& name, const std::string& mode, const std::string& flags,
                       int ranks = 2) {
  return run_fsdp_worker("fsdp_units_" + name, mode, flags, ranks);
}

}  // namespace

// Fine-tuning: a frozen block (called twice per forward) between trainable ones,
// and a frozen root. The backward through frozen weights needs them gathered.
TEST(FsdpUnits, FrozenBlockAndFrozenRootEqualOneProcessAndDdp) {
  for (const std::string frozen : {"b1", "root", "b0,b2"}) {
    SCOPED_TRACE("frozen " + frozen);
    std::vector<std::string> parts;
    std::stringstream list(frozen);
    for (std::string item; std::getline(list, item, ',');) parts.push_back(item);
    const auto expected = one_process("adam", false, 0, parts).params;
    expect_close(expected, run_worker("frozen_" + frozen, "train", "--freeze " + frozen));
    expect_close(expected, run_worker("frozen_ddp_" + frozen, "train", "--strategy ddp --freeze " + frozen));
    expect_close(expected, run_worker("frozen_sgo_" + frozen, "train",
                                      "--sharding SHARD_GRAD_OP --freeze " + frozen));
  }
}

// A loss term only rank 1 uses: its parameters get a gradient on one rank only.
// The ranks must still reduce the units in the same order (before the fix they
// mixed equal-sized units' gradients or hung on different sizes).
TEST(FsdpUnits, ParametersWithAGradientOnOneRankOnlyEqualOneProcess) {
  const auto expected = aux_one_process("conditional");
  expect_close(expected, run_worker("conditional", "conditional", ""));
  expect_close(expected, run_worker("conditional_sgo", "conditional", "--sharding SHARD_GRAD_OP"));
}

// Two synced micro-batches (no no_backward_sync) whose second loss leaves out a
// unit: that unit's gradient pieces from the first must survive the second.
TEST(FsdpUnits, AccumulationWithoutNoBackwardSyncKeepsAnUnreachedUnitsGradient) {
  const auto expected = aux_one_process("accumulate_partial");
  expect_close(expected, run_worker("accumulate_partial", "accumulate_partial", ""));
  expect_close(expected, run_worker("accumulate_partial_sgo", "accumulate_partial",
                                    "--sharding SHARD_GRAD_OP"));
  expect_close(expected, run_worker("accumulate_partial_ns", "accumulate_partial",
                                    "--sharding NO_SHARD"));
}

// A sharded save killed (SIGKILL, by strace's fault injection) before each of
// its renames, fsyncs, unlinks and directory calls on the checkpoint's paths in
// turn (strace counts each kind of call separately): every interruption
// leaves a complete checkpoint at the path (the previous one or the new one),
// and the next save succeeds and keeps it until it has a newer one.
TEST(FsdpUnits, ShardedSaveInterruptedAtAnyStepLeavesACompleteCheckpoint) {
  if (testutil::run_command("strace -f -qq -o /dev/null true").status != 0) {
    GTEST_SKIP() << "strace cannot trace here (it injects the faults)";
  }
  const std::string dir = ::testing::TempDir() + "/fsdp_units_interrupted_save";
  fabric::fs::remove_all(dir);
  fabric::fs::make_directories(dir);
  const std::string ckpt = dir + "/ckpt";
  const std::string save = g_fsdp_worker + " save_once " + dir + " --state-dict sharded --devices 1 --tag ";
  const auto step_in = [&]() -> int64_t {
    return fabric::read_checkpoint(ckpt).toGenericDict().at("step").toInt();
  };
  // Where the file system swaps directories atomically (renameat2
  // RENAME_EXCHANGE: ext4, tmpfs, xfs, btrfs, overlayfs), the path itself always
  // holds a complete checkpoint; elsewhere a load finds the surviving copy.
  const std::string probe_a = dir + "/probe_a", probe_b = dir + "/probe_b";
  fabric::fs::make_directories(probe_a);
  fabric::fs::make_directories(probe_b);
  const bool exchange = ::renameat2(AT_FDCWD, probe_a.c_str(), AT_FDCWD, probe_b.c_str(), RENAME_EXCHANGE) == 0;
  fabric::fs::remove_all(probe_a);
  fabric::fs::remove_all(probe_b);
  auto first = testutil::run_command(save + "1");
  ASSERT_EQ(first.status, 0) << first.output;
  ASSERT_EQ(step_in(), 1);
  // strace counts each call separately: kill before the n-th call of one kind,
  // for every n that kind reaches, kind by kind.
  int64_t previous = 1, interrupted = 0;
  // Only calls on the checkpoint's own paths count (-P; fds are matched by path):
  // not Open MPI's start-up and clean-up.
  std::string paths;
  for (const std::string& folder : {ckpt, ckpt + ".partial", ckpt + ".old"}) {
    paths += " -P " + folder;
    for (const std::string file : {"__0_0.distcp", "__0_0.metadata", ".metadata", "meta.pt"}) {
      paths += " -P " + folder + "/" + file;
    }
  }
  for (const std::string call : {"mkdir", "rename", "renameat", "renameat2", "fsync", "fdatasync",
                                 "unlink", "unlinkat", "rmdir"}) {
    for (int n = 1; n <= 50; ++n) {
      SCOPED_TRACE("killed before " + call + " number " + std::to_string(n));
      auto killed = testutil::run_command("strace -f -qq -o /dev/null" + paths + " -e trace=" + call +
                                          " -e inject=" + call + ":signal=KILL:when=" +
                                          std::to_string(n) + " " + save + std::to_string(previous + 1));
      if (killed.status == 0) {  // the save made fewer such calls: it completed
        ASSERT_EQ(step_in(), previous + 1);
        previous += 1;
        break;
      }
      ++interrupted;
      if (exchange) {
        EXPECT_TRUE(fabric::fs::exists(ckpt + "/.metadata")) << "no complete checkpoint at " << ckpt;
      }
      int64_t now = 0;
      ASSERT_NO_THROW(now = step_in()) << killed.output;
      EXPECT_TRUE(now == previous || now == previous + 1) << "step " << now << ", saved " << previous;
      auto next = testutil::run_command(save + std::to_string(now + 10));
      ASSERT_EQ(next.status, 0) << next.output;
      ASSERT_EQ(step_in(), now + 10);
      previous = now + 10;
    }
  }
  EXPECT_GE(interrupted, 6) << "the save made fewer file-system calls than expected";
  EXPECT_FALSE(fabric::fs::exists(ckpt + ".partial"));
  EXPECT_FALSE(fabric::fs::exists(ckpt + ".old"));
}

// fabric.load(path, {{"optimizer", opt}}) with the model not in the state.
TEST(FsdpUnits, LoadingOnlyTheOptimizerResumes) {
  expect_close(one_process("adam").params, run_worker("optimizer_only", "optimizer_only", ""));
  expect_close(one_process("adamw").params,
               run_worker("optimizer_only_adamw", "optimizer_only", "--optimizer adamw"));
}

TEST(FsdpUnits, AdamAdamWAndSgdMomentumEqualOneProcessAndDdp) {
  for (const char* optimizer : {"adam", "adamw", "sgd"}) {
    SCOPED_TRACE(optimizer);
    const auto reference = one_process(optimizer);
    const std::string flag = std::string("--optimizer ") + optimizer;
    expect_close(reference.params, run_worker(std::string("fsdp_") + optimizer, "train", flag));
    expect_close(reference.params,
                 run_worker(std::string("ddp_") + optimizer, "train", flag + " --strategy ddp"));
  }
}

TEST(FsdpUnits, ShardGradOpAndNoShardEqualOneProcess) {
  const auto reference = one_process("adam");
  for (const char* sharding : {"SHARD_GRAD_OP", "NO_SHARD"}) {
    SCOPED_TRACE(sharding);
    expect_close(reference.params,
                 run_worker(sharding, "train", std::string("--sharding ") + sharding));
  }
}

TEST(FsdpUnits, KeepingParametersAfterForwardEqualsOneProcess) {
  expect_close(one_process("adam").params, run_worker("no_reshard", "train", "--no-reshard"));
}

// Sequential children chosen by a policy on the module type become units with
// their parameter names unchanged (the worker checks there are 3 units).
TEST(FsdpUnits, AutoWrappedSequentialChildrenEqualOneProcess) {
  expect_close(one_process("adamw", /*sequential=*/true).params,
               run_worker("auto_wrap", "train", "--sequential --auto-wrap --optimizer adamw"));
}

TEST(FsdpUnits, NoBackwardSyncAccumulationEqualsOneProcess) {
  expect_close(one_process("adam").params, run_worker("accumulate", "accumulate", ""));
}

// The norm clip_gradients returns is the norm over every shard: the one-process
// (and DDP) norm of the whole gradient.
TEST(FsdpUnits, ClipGradientsNormEqualsOneProcess) {
  const auto reference = one_process("sgd", false, 0.05);
  const auto dir = run_worker("clip", "clip", "--optimizer sgd");
  expect_close(reference.params, dir);
  std::vector<torch::Tensor> norms;
  for (double n : reference.norms) norms.push_back(torch::tensor(n));
  expect_close(norms, dir, 1e-5, "norms");
}

// bf16-mixed: autocast computes in bfloat16, so fsdp is compared with DDP under
// the same precision. With gradients reduced in fp32 (reduce_dtype "fp32") the
// same bf16 forward runs on each rank and only the reduction order differs:
// 1e-4. With Lightning's default mapping the gradients travel in bf16 (8-bit
// mantissa): 2e-3. Loosely (5e-2), DDP under bf16-mixed equals the fp32 run.
TEST(FsdpUnits, Bf16MixedEqualsDdpUnderTheSamePrecision) {
  const auto ddp_dir = run_worker("bf16_ddp", "train", "--strategy ddp --precision bf16-mixed");
  const auto ddp = read_tensor_list(ddp_dir + "/params_rank0.pt");
  ASSERT_FALSE(ddp.empty());
  expect_close(ddp, run_worker("bf16_fsdp32", "train", "--precision bf16-mixed --reduce-dtype fp32"), 1e-4);
  expect_close(ddp, run_worker("bf16_fsdp", "train", "--precision bf16-mixed"), 2e-3);
  expect_close(one_process("adam").params, ddp_dir, 5e-2);
}

// Loss scaling with sharded gradients: an inf in one rank's piece makes every
// rank skip that step (the worker checks parameters and scales on every rank).
TEST(FsdpUnits, Fp16LossScalingSkipsTheSameStepOnEveryRank) {
  run_worker("fp16_inf", "inf", "--fp16-scaler");
}

// The fused optimizers on FSDP's shards and under DDP: the same parameters as
// LibTorch's per-parameter optimizers in one process; and with fp16 loss scaling
// through their kernels (GradScaler::prepare_step only checks a fused optimizer's
// gradient shards), an inf in one rank's shard skips the step on every rank.
TEST(FsdpUnits, FusedOptimizersOnShardsEqualOneProcess) {
  for (const char* optimizer : {"adam", "adamw", "sgd"}) {
    SCOPED_TRACE(optimizer);
    const auto reference = one_process(optimizer);
    const std::string fused = std::string("fused_") + optimizer;
    expect_close(reference.params, run_worker("fsdp_" + fused, "train", "--optimizer " + fused));
    expect_close(reference.params, run_worker("ddp_" + fused, "train", "--optimizer " + fused + " --strategy ddp"));
  }
  run_worker("fp16_inf_fused", "inf", "--fp16-scaler --optimizer fused_adam");
}

// Ranks that run different units get an error naming them, not a hang.
TEST(FsdpUnits, DifferentUnitsOnDifferentRanksIsAnError) {
  const std::string dir = ::testing::TempDir() + "/fsdp_units_mismatch";
  fabric::fs::make_directories(dir);
  auto result = testutil::run_command("timeout 120 " + mpirun() + " " + g_fsdp_worker + " mismatch " + dir);
  EXPECT_NE(result.status, 0) << result.output;
  EXPECT_NE(result.status, 124) << "timed out: " << result.output;
  EXPECT_NE(result.output.find("the ranks are gathering different sharding units"), std::string::npos)
      << result.output;
  EXPECT_NE(result.output.find("'b2'"), std::string::npos) << result.output;
}

TEST(FsdpUnits, TiedWeightAcrossUnitsAndOptimizerStateAreErrors) {
  run_worker("errors", "errors", "");
}

// Parameters + gradients + Adam state at rest: distinct storages at most 0.55x
// DDP's at 2 ranks; the CPU allocator (counting every tensor) agrees.
TEST(FsdpUnits, MemoryAtRestIsAboutHalfOfDdp) {
  const auto fsdp_dir = run_worker("memory_fsdp", "memory", "--width 256");
  const auto ddp_dir = run_worker("memory_ddp", "memory", "--width 256 --strategy ddp");
  for (int rank = 0; rank < 2; ++rank) {
    SCOPED_TRACE("rank " + std::to_string(rank));
    int64_t fsdp_state = 0, fsdp_live = 0, fsdp_peak = 0, ddp_state = 0, ddp_live = 0, ddp_peak = 0;
    std::ifstream(fsdp_dir + "/memory_rank" + std::to_string(rank) + ".txt") >> fsdp_state >>
        fsdp_live >> fsdp_peak;
    std::ifstream(ddp_dir + "/memory_rank" + std::to_string(rank) + ".txt") >> ddp_state >>
        ddp_live >> ddp_peak;
    ASSERT_GT(ddp_state, 0);
    ASSERT_GT(ddp_live, 0);
    const double state_ratio = double(fsdp_state) / double(ddp_state);
    const double live_ratio = double(fsdp_live) / double(ddp_live);
    std::cout << "rank " << rank << ": fsdp/ddp state at rest " << state_ratio
              << ", allocator live at rest " << live_ratio << ", allocator peak "
              << double(fsdp_peak) / double(ddp_peak) << std::endl;
    EXPECT_LE(state_ratio, 0.55);
    EXPECT_GE(state_ratio, 0.45);
    EXPECT_LE(live_ratio, 0.6);
    EXPECT_LT(fsdp_peak, ddp_peak);
  }
}

// state_dict_type="sharded": a torch.distributed.checkpoint directory (one data
// file per rank, .metadata, meta.pt), reloaded at 2 ranks and at 1 rank
// (resuming exactly as the uninterrupted run), at 3 and 4 ranks (the same
// weights and optimizer state as the full file), and consolidated into the
// very file a full save writes (Python reads it, and converts ours itself).
TEST(FsdpUnits, ShardedCheckpointReloadsAtTwoRanksAndOneRankAndConsolidates) {
  const auto reference = one_process("adam").params;
  const auto saved = run_worker("sharded_save", "save", "--state-dict sharded");
  expect_close(reference, saved);  // the run that saved went on uninterrupted
  const std::string ckpt = saved + "/ckpt";
  for (const char* file : {".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"}) {
    EXPECT_TRUE(fabric::fs::exists(ckpt + "/" + file)) << file;
  }
  EXPECT_FALSE(fabric::fs::exists(ckpt + ".partial"));
  // Each rank wrote its own piece of every sharded tensor.
  const fabric::dcp::Reader reader(ckpt);
  const auto& weight = reader.metadata().entries.at("model.b0.fc.weight");
  EXPECT_EQ(weight.size, (std::vector<int64_t>{7, 7}));
  int64_t on_rank0 = 0, on_rank1 = 0;
  for (size_t i = 0; i < weight.chunks.size(); ++i) {
    (weight.storage[i].relative_path == "__0_0.distcp" ? on_rank0 : on_rank1) += weight.chunks[i].numel();
  }
  EXPECT_GT(on_rank0, 0);
  EXPECT_EQ(on_rank0 + on_rank1, 49);
  for (const auto& s : reader.metadata().entries.at("model.b0.fc.bias").storage) {
    EXPECT_EQ(s.relative_path, "__1_0.distcp");  // wholly on rank 1
  }
  EXPECT_TRUE(reader.has("optimizer.state.b0.fc.weight.exp_avg"));
  std::map<std::string, torch::Tensor> full;
  testutil::flatten_tensors(fabric::read_checkpoint(saved + "/full.pt"), "", full);
  // A directory an interrupted save left behind does not matter.
  fabric::fs::make_directories(ckpt + ".partial");
  std::ofstream(ckpt + ".partial/__0_0.distcp") << "garbage";

  for (int ranks : {3, 4}) {  // resharded: other pieces of the same tensors
    SCOPED_TRACE("reloaded at " + std::to_string(ranks) + " ranks");
    const auto reloaded = run_worker("sharded_reload" + std::to_string(ranks), "reload",
                                     "--state-dict sharded --from " + ckpt, ranks);
    std::map<std::string, torch::Tensor> got;
    testutil::flatten_tensors(fabric::read_checkpoint(reloaded + "/reloaded.pt"), "", got);
    ASSERT_EQ(got.size(), full.size());
    for (const auto& [path, tensor] : full) {
      ASSERT_TRUE(got.count(path)) << path;
      EXPECT_TRUE(torch::equal(got[path], tensor)) << path;
    }
  }
  expect_close(reference, run_worker("sharded_resume4", "resume", "--state-dict sharded --from " + ckpt, 4),
               1e-5, "params", 4);
  expect_close(reference, run_worker("sharded_resume2", "resume", "--state-dict sharded --from " + ckpt));
  expect_close(reference, run_worker("sharded_resume1", "resume", "--from " + ckpt, /*ranks=*/1),
               1e-5, "params", /*ranks=*/1);
  expect_close(reference, run_worker("sharded_resume_ddp", "resume", "--strategy ddp --from " + ckpt));

  // The converter writes what a full save writes.
  const std::string consolidated = saved + "/consolidated.pt";
  auto tool = testutil::run_command(g_consolidate + " " + ckpt + " " + consolidated);
  ASSERT_EQ(tool.status, 0) << tool.output;
  std::map<std::string, torch::Tensor> merged;
  testutil::flatten_tensors(fabric::read_checkpoint(consolidated), "", merged);
  ASSERT_EQ(merged.size(), full.size());
  for (const auto& [path, tensor] : full) {
    ASSERT_TRUE(merged.count(path)) << path;
    EXPECT_TRUE(torch::equal(merged[path], tensor)) << path;
  }
  auto python = testutil::run_command(
      testutil::python() + " -c \"import torch; c = torch.load('" + consolidated +
      "', weights_only=True); print(tuple(c['model']['b0.fc.weight'].shape), c['step'])\"");
  EXPECT_EQ(python.status, 0) << python.output;
  EXPECT_NE(python.output.find("(7, 7) 5"), std::string::npos) << python.output;
  // PyTorch's own converter reads the directory as it is.
  const std::string by_python = saved + "/by_python.pt";
  auto convert = testutil::run_command(
      testutil::python() + " -c \"import torch; from torch.distributed.checkpoint.format_utils import "
      "dcp_to_torch_save as f; f('" + ckpt + "', '" + by_python + "'); c = torch.load('" + by_python +
      "'); f = torch.load('" + saved + "/full.pt'); "
      "assert all(torch.equal(c['model'][k], v) for k, v in f['model'].items()); "
      "assert torch.equal(c['optimizer']['state']['b0.fc.weight']['exp_avg'], "
      "f['optimizer']['state'][c['optimizer']['param_groups'][0]['params'].index('b0.fc.weight')]['exp_avg']); "
      "print('python converted', len(c['model']))\"");
  EXPECT_EQ(convert.status, 0) << convert.output;
  EXPECT_NE(convert.output.find("python converted "), std::string::npos) << convert.output;
}

// A full checkpoint written at 1 rank loads into a 2-rank fsdp run that writes
// sharded checkpoints, which resumes exactly.
TEST(FsdpUnits, OneRankFullCheckpointLoadsIntoTwoRankShardedRun) {
  const auto reference = one_process("adam").params;
  const auto saved = run_worker("full_save1", "save", "", /*ranks=*/1);
  expect_close(reference, run_worker("full_to_sharded", "resume",
                                     "--state-dict sharded --from " + saved + "/ckpt"));
}

// A sharded load reads each rank's pieces only: the most the load allocates at
// once is a share of the full model and Adam state that shrinks with the ranks
// (its pieces, and a copy of the Adam moments the optimizer's codec makes: 1.67x
// the shard), where the earlier route gathered the full state on every rank.
TEST(FsdpUnits, ShardedLoadAllocatesOnlyItsPieces) {
  const auto saved = run_worker("sharded_save_wide", "save", "--state-dict sharded --width 96");
  int64_t full_bytes = 0;
  std::map<std::string, torch::Tensor> full;
  testutil::flatten_tensors(fabric::read_checkpoint(saved + "/full.pt"), "", full);
  for (const auto& [path, t] : full) full_bytes += t.numel() * static_cast<int64_t>(t.element_size());
  ASSERT_GT(full_bytes, 300000);
  std::map<int, int64_t> worst;
  for (int ranks : {2, 4}) {
    const auto dir = run_worker("sharded_load_memory" + std::to_string(ranks), "reload",
                                "--state-dict sharded --width 96 --from " + saved + "/ckpt", ranks);
    for (int r = 0; r < ranks; ++r) {
      int64_t peak = -1;
      std::ifstream(dir + "/load_memory_rank" + std::to_string(r) + ".txt") >> peak;
      std::cout << ranks << " ranks, rank " << r << ": load peak " << peak << " bytes of a " << full_bytes
                << "-byte state" << std::endl;
      EXPECT_GE(peak, 0);
      EXPECT_LT(peak, full_bytes * 1.8 / ranks) << "rank " << r << " of " << ranks;
      worst[ranks] = std::max(worst[ranks], peak);
    }
  }
  EXPECT_LT(worst[4], worst[2] * 0.6) << "a sharded load's memory does not shrink with the ranks";
}

// The same units over NCCL on CUDA devices (spawned by Fabric, 1 and 2 ranks when
// there are GPUs): training and a sharded save/resume equal one process.
TEST(FsdpCuda, NcclUnitsAndShardedCheckpointMatchOneProcess) {
  const int gpus = static_cast<int>(fabric::cuda_device_count());
  if (gpus == 0) GTEST_SKIP() << "no GPU visible";
  const auto reference = one_process("adam").params;
  for (int world : {1, 2}) {
    if (world > gpus) continue;
    SCOPED_TRACE("world " + std::to_string(world));
    const std::string flags = " --accelerator cuda --devices " + std::to_string(world);
    const std::string dir = ::testing::TempDir() + "/fsdp_cuda_" + std::to_string(world);
    fabric::fs::remove_all(dir);
    fabric::fs::make_directories(dir);
    auto saved = testutil::run_command(g_fsdp_worker + " save " + dir + flags + " --state-dict sharded");
    ASSERT_EQ(saved.status, 0) << saved.output;
    expect_close(reference, dir, 1e-4, "params", world);
    const std::string resumed = dir + "/resumed";
    fabric::fs::make_directories(resumed);
    auto run = testutil::run_command(g_fsdp_worker + " resume " + resumed + flags +
                                     " --state-dict sharded --from " + dir + "/ckpt");
    ASSERT_EQ(run.status, 0) << run.output;
    expect_close(reference, resumed, 1e-4, "params", world);
  }
}
