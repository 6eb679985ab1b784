// Option resolution: defaults, aliases, LT_* overrides, cluster variables, and an
// error naming the bad value and the valid ones for every invalid option.
#include <torch/torch.h>

#include <c10/util/Exception.h>

#include <malloc.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <set>

#include "accelerators/accelerator.h"
#include "accelerators/cpu_memory.h"
#include "launchers/cluster_environment.h"
#include "strategies/process_group.h"
#include "fabric/fabric.h"
#include "test_util.h"

using fabric::Fabric;
using testutil::EnvGuard;

namespace {

bool has_cuda() { return fabric::cuda_device_count() > 0; }

// Collects LibTorch warnings (TORCH_WARN) for the scope.
class WarningCollector : public c10::WarningHandler {
 public:
  void process(const c10::Warning& warning) override { messages.push_back(warning.msg()); }
  std::vector<std::string> messages;
};

}  // namespace

TEST(Options, DefaultsResolveToOneDeviceFp32) {
  Fabric fabric;
  // devices="auto" means every visible GPU, as in Lightning: DDP on a multi-GPU machine.
  const int64_t gpus = fabric::cuda_device_count();
  EXPECT_EQ(fabric.accelerator(), has_cuda() ? "cuda" : "cpu");
  EXPECT_EQ(fabric.strategy().name(), gpus > 1 ? "ddp" : "single_device");
  EXPECT_EQ(fabric.precision().name(), "32-true");
  EXPECT_EQ(fabric.world_size(), std::max<int64_t>(gpus, 1));
  EXPECT_EQ(fabric.global_rank(), 0);
  EXPECT_TRUE(fabric.is_global_zero());
  EXPECT_EQ(fabric.device().type(), has_cuda() ? c10::kCUDA : c10::kCPU);
}

TEST(Options, PrecisionAliases) {
  EXPECT_EQ(Fabric({.accelerator = "cpu", .precision = 32}).precision().name(), "32-true");
  EXPECT_EQ(Fabric({.accelerator = "cpu", .precision = 64}).precision().name(), "64-true");
  EXPECT_EQ(Fabric({.accelerator = "cpu", .precision = "bf16"}).precision().name(), "bf16-mixed");
  EXPECT_EQ(Fabric({.accelerator = "cpu", .precision = "16-true"}).precision().name(), "16-true");
  EXPECT_EQ(Fabric({.accelerator = "cpu", .precision = "bf16-true"}).precision().name(),
            "bf16-true");
}

TEST(Options, SixteenMixedOnCpuFallsBackToBf16WithWarning) {
  WarningCollector collector;
  c10::WarningUtils::WarningHandlerGuard guard(&collector);
  Fabric fabric({.accelerator = "cpu", .precision = 16});
  EXPECT_EQ(fabric.precision().name(), "bf16-mixed");
  EXPECT_EQ(fabric.precision().scaler(), nullptr);
  ASSERT_EQ(collector.messages.size(), 1u);
  EXPECT_NE(collector.messages[0].find("bf16-mixed"), std::string::npos);
}

TEST(Options, InvalidAcceleratorListsValidOnes) {
  EXPECT_THROW_WITH(Fabric({.accelerator = "tpu"}), "accelerator='tpu'", "'cpu'", "'cuda'",
                    "'gpu'", "'auto'");
}

TEST(Options, InvalidPrecisionListsValidOnes) {
  EXPECT_THROW_WITH(Fabric({.accelerator = "cpu", .precision = "8-mixed"}),
                    "precision='8-mixed'", "'32-true'", "'bf16-mixed'", "'16-true'");
}

TEST(Options, InvalidStrategyListsValidOnes) {
  EXPECT_THROW_WITH(Fabric({.accelerator = "cpu", .strategy = "ddp_spawn_xyz"}),
                    "strategy='ddp_spawn_xyz'", "'auto'", "'single_device'");
}

TEST(Options, CudaWithoutGpuIsAnError) {
  if (has_cuda()) GTEST_SKIP() << "a GPU is visible";
  EXPECT_THROW_WITH(Fabric({.accelerator = "cuda", .devices = 3}), "accelerator='cuda'",
                    "no CUDA device", "'cpu'");
  EXPECT_THROW_WITH(Fabric({.accelerator = "gpu"}), "accelerator='gpu'", "no CUDA device");
}

TEST(Options, MoreGpusThanVisibleIsAnError) {
  if (!has_cuda()) GTEST_SKIP() << "no GPU visible";
  const int too_many = static_cast<int>(fabric::cuda_device_count()) + 1;
  EXPECT_THROW_WITH(Fabric({.accelerator = "cuda", .devices = too_many}),
                    "devices=" + std::to_string(too_many), "CUDA device(s) are visible");
}

TEST(Options, MultiProcessWorldsNeedAMultiProcessStrategy) {
  EXPECT_THROW_WITH(Fabric({.accelerator = "cpu", .strategy = "single_device", .devices = 3}),
                    "world of 3", "strategy='ddp'");
  // "auto" picks ddp for more than one process.
  EXPECT_EQ(Fabric({.accelerator = "cpu", .devices = 3}).strategy().name(), "ddp");
  EXPECT_EQ(Fabric({.accelerator = "cpu", .devices = 3}).world_size(), 3);
  // Several nodes need a launcher on every node.
  EXPECT_THROW_WITH(Fabric({.accelerator = "cpu", .num_nodes = 2}), "num_nodes=2", "fabric-run");
  EXPECT_THROW_WITH(Fabric({.accelerator = "cpu", .devices = 2, .process_group_backend = "gloo"}),
                    "'gloo' is not available", "'mpi'");
  EXPECT_THROW_WITH(Fabric({.accelerator = "cpu", .devices = 2, .process_group_backend = "nccl"}),
                    "needs accelerator='cuda'");
  EXPECT_THROW_WITH(Fabric({.accelerator = "cpu", .devices = 2, .process_group_backend = "shm"}),
                    "'shm' is not supported", "'mpi'");
}

TEST(Options, ExternalLauncherResolvesDevicesAndRanks) {
  EnvGuard rank("RANK", "3"), size("WORLD_SIZE", "4"), local("LOCAL_RANK", "1"),
      local_size("LOCAL_WORLD_SIZE", "2"), node("NODE_RANK", "1");
  Fabric fabric({.accelerator = "cpu"});
  EXPECT_EQ(fabric.strategy().name(), "ddp");
  EXPECT_EQ(fabric.global_rank(), 3);
  EXPECT_EQ(fabric.local_rank(), 1);
  EXPECT_EQ(fabric.node_rank(), 1);
  EXPECT_EQ(fabric.world_size(), 4);
  EXPECT_FALSE(fabric.is_global_zero());
  EXPECT_THROW_WITH(Fabric({.accelerator = "cpu", .devices = 3}), "says the world has 4",
                    "devices=3");
}

TEST(Options, InvalidDeviceValues) {
  EXPECT_THROW_WITH(Fabric({.accelerator = "cpu", .devices = 0}), "devices=0", ">= 1");
  EXPECT_THROW_WITH(Fabric({.accelerator = "cpu", .devices = {0, 1}}), "devices=[0, 1]",
                    "number of processes");
  EXPECT_THROW_WITH(Fabric({.accelerator = "cpu", .devices = "two"}), "devices='two'",
                    "'auto'");
  EXPECT_THROW_WITH(Fabric({.accelerator = "cpu", .num_nodes = 0}), "num_nodes=0");
}

TEST(Options, DevicesParse) {
  EXPECT_EQ(fabric::Devices("auto").kind(), fabric::Devices::Kind::kAuto);
  EXPECT_EQ(fabric::Devices("2").count(), 2);
  EXPECT_EQ(fabric::Devices("-1").count(), -1);
  EXPECT_EQ(fabric::Devices("0,1").indices(), (std::vector<int>{0, 1}));
  EXPECT_EQ(fabric::Devices("[1, 3]").indices(), (std::vector<int>{1, 3}));
  EXPECT_EQ(fabric::Devices({2, 0}).str(), "[2, 0]");
}

// Two ranks on one GPU is what NCCL refuses at the first collective: a repeated
// index fails when the option is written, however it is spelled.
TEST(Options, RepeatedDeviceIndexIsRejected) {
  EXPECT_THROW_WITH(fabric::Devices("0,0"), "devices='0,0'", "device 0 more than once",
                    "distinct");
  EXPECT_THROW_WITH(fabric::Devices("[1, 0, 1]"), "device 1 more than once");
  EXPECT_THROW_WITH(fabric::Devices({0, 0}), "device 0 more than once");
  EXPECT_THROW_WITH(Fabric({.accelerator = "cpu", .devices = "2,2"}), "more than once");
  testutil::EnvGuard env("LT_DEVICES", "0,0");
  EXPECT_THROW_WITH(Fabric({.accelerator = "cpu"}), "more than once");
}

TEST(Options, EnvironmentOverridesDefaults) {
  EnvGuard precision("LT_PRECISION", "bf16-mixed");
  EnvGuard accelerator("LT_ACCELERATOR", "cpu");
  Fabric fabric;
  EXPECT_EQ(fabric.precision().name(), "bf16-mixed");
  EXPECT_EQ(fabric.accelerator(), "cpu");
}

TEST(Options, EnvironmentConflictUnderCliIsAnError) {
  EnvGuard cli("LT_CLI_USED", "1");
  EnvGuard precision("LT_PRECISION", "bf16-mixed");
  EXPECT_THROW_WITH(Fabric({.accelerator = "cpu", .precision = "64-true"}), "precision=64-true",
                    "--precision=bf16-mixed");
  // The same value in both places is no conflict.
  EXPECT_EQ(Fabric({.accelerator = "cpu", .precision = "bf16-mixed"}).precision().name(),
            "bf16-mixed");
}

TEST(Options, InvalidEnvironmentValueIsNamed) {
  EnvGuard precision("LT_PRECISION", "4-true");
  EXPECT_THROW_WITH(Fabric({.accelerator = "cpu"}), "precision='4-true'");
}

TEST(Options, BadRankVariablesAreRejected) {
  {
    EnvGuard rank("RANK", "5"), size("WORLD_SIZE", "2");
    EXPECT_THROW_WITH(Fabric({.accelerator = "cpu"}), "RANK=5", "WORLD_SIZE=2");
  }
  {
    EnvGuard rank("RANK", "zero"), size("WORLD_SIZE", "1");
    EXPECT_THROW_WITH(Fabric({.accelerator = "cpu"}), "RANK='zero'");
  }
  {
    EnvGuard rank("RANK", "0"), size("WORLD_SIZE", "2");
    EXPECT_THROW_WITH(Fabric({.accelerator = "cpu", .devices = 1}), "2 processes", "devices=1");
  }
}

TEST(Options, SlurmVariablesAreRead) {
  EnvGuard procid("SLURM_PROCID", "3"), ntasks("SLURM_NTASKS", "4"), localid("SLURM_LOCALID", "1"),
      nodeid("SLURM_NODEID", "1"), nnodes("SLURM_NNODES", "2"),
      nodelist("SLURM_NODELIST", "gpu[12-13]"), job("SLURM_JOB_ID", "987654"),
      name("SLURM_JOB_NAME", "train"), step("SLURM_STEP_ID", "0");
  auto env = fabric::launchers::detect_cluster_environment();
  EXPECT_EQ(env.kind, "slurm");
  EXPECT_EQ(env.global_rank, 3);
  EXPECT_EQ(env.world_size, 4);
  EXPECT_EQ(env.local_rank, 1);
  EXPECT_EQ(env.node_rank, 1);
  EXPECT_EQ(env.local_world_size, 2);
  EXPECT_EQ(env.num_nodes, 2);
  EXPECT_EQ(env.main_address, "gpu12");
  EXPECT_EQ(env.main_port, 15000 + 7654);
  EXPECT_FALSE(env.pmix);
  {
    EnvGuard pmix("PMIX_RANK", "3");
    EXPECT_TRUE(fabric::launchers::detect_cluster_environment().pmix);
  }
  // An interactive `srun bash` is not a launcher.
  EnvGuard interactive("SLURM_JOB_NAME", "bash");
  EXPECT_EQ(fabric::launchers::detect_cluster_environment().kind, "none");
}

// The sbatch script itself has SLURM_PROCID=0 and the job's SLURM_NTASKS but is
// not one of the job's tasks (no step id): a program run there directly is a
// plain process, which may start the ranks itself (through mpirun on the CPU).
TEST(Options, TheBatchScriptIsNotAnSrunTask) {
  EnvGuard procid("SLURM_PROCID", "0"), ntasks("SLURM_NTASKS", "2"), localid("SLURM_LOCALID", "0"),
      nodeid("SLURM_NODEID", "0"), nnodes("SLURM_NNODES", "1"), job("SLURM_JOB_ID", "17"),
      name("SLURM_JOB_NAME", "train.sh"), step("SLURM_STEP_ID", std::nullopt),
      stepid("SLURM_STEPID", std::nullopt);
  EXPECT_EQ(fabric::launchers::detect_cluster_environment().kind, "none");
  Fabric fabric({.accelerator = "cpu"});
  EXPECT_EQ(fabric.world_size(), 1);
}

// Inside an allocation the step's own variables win over the job's (srun -n 4 in
// an 8-task job), and SLURM's compressed per-node counts are read.
TEST(Options, SlurmStepVariablesWinOverTheJobs) {
  EnvGuard procid("SLURM_PROCID", "2"), ntasks("SLURM_NTASKS", "8"), localid("SLURM_LOCALID", "0"),
      nodeid("SLURM_NODEID", "1"), nnodes("SLURM_NNODES", "4"), step("SLURM_STEP_ID", "3"),
      step_tasks("SLURM_STEP_NUM_TASKS", "4"), step_nodes("SLURM_STEP_NUM_NODES", "2"),
      per_node("SLURM_STEP_TASKS_PER_NODE", "2(x2)"), job_per_node("SLURM_TASKS_PER_NODE", "2(x4)"),
      job_list("SLURM_JOB_NODELIST", "a[1-4]"), step_list("SLURM_STEP_NODELIST", "rack[2-3]-n[07-08]"),
      job("SLURM_JOB_ID", "42"), name("SLURM_JOB_NAME", "train");
  auto env = fabric::launchers::detect_cluster_environment();
  EXPECT_EQ(env.kind, "slurm");
  EXPECT_EQ(env.world_size, 4);
  EXPECT_EQ(env.num_nodes, 2);
  EXPECT_EQ(env.local_world_size, 2);
  EXPECT_EQ(env.main_address, "rack2-n07");
  EXPECT_EQ(env.main_port, 15042);
  {
    EnvGuard uneven("SLURM_STEP_TASKS_PER_NODE", "3,1");
    EXPECT_THROW_WITH(fabric::launchers::detect_cluster_environment(), "unevenly",
                      "SLURM_STEP_TASKS_PER_NODE=3,1", "--ntasks-per-node");
  }
  {
    EnvGuard bad("SLURM_STEP_TASKS_PER_NODE", "2(x");
    EXPECT_THROW_WITH(fabric::launchers::detect_cluster_environment(), "SLURM_STEP_TASKS_PER_NODE='2(x'");
  }
  // devices='auto' follows --ntasks-per-node.
  Fabric fabric({.accelerator = "cpu"});
  EXPECT_EQ(fabric.world_size(), 4);
  EXPECT_EQ(fabric.global_rank(), 2);
  EXPECT_EQ(fabric.node_rank(), 1);
}

// srun without PMIx (MpiDefault=none, no --mpi=pmix) cannot give Open MPI a
// world: the error says what would work, before any rank waits for another.
TEST(Options, SrunWithoutPmixSaysToAddItOrUseMpirun) {
  EnvGuard procid("SLURM_PROCID", "0"), ntasks("SLURM_NTASKS", "2"), localid("SLURM_LOCALID", "0"),
      nodeid("SLURM_NODEID", "0"), nnodes("SLURM_NNODES", "1"), step("SLURM_STEP_ID", "0"),
      per_node("SLURM_TASKS_PER_NODE", "2"), job("SLURM_JOB_ID", "43"), name("SLURM_JOB_NAME", "t"),
      type("SLURM_MPI_TYPE", "none"), pmix("PMIX_RANK", std::nullopt);
  Fabric fabric({.accelerator = "cpu"});
  EXPECT_EQ(fabric.world_size(), 2);
  EXPECT_THROW_WITH(fabric.launch(), "srun started these 2 tasks without PMIx", "SLURM_MPI_TYPE='none'",
                    "--mpi=pmix", "mpirun");
}

// On the CPU the ranks are one MPI world, which srun must start: one task per
// node with devices=2 is an error with the srun line that works.
TEST(Options, OneSrunTaskWithCpuDevicesNamesTheSrunLine) {
  EnvGuard procid("SLURM_PROCID", "0"), ntasks("SLURM_NTASKS", "1"), localid("SLURM_LOCALID", "0"),
      nodeid("SLURM_NODEID", "0"), nnodes("SLURM_NNODES", "1"), step("SLURM_STEP_ID", "0"),
      job("SLURM_JOB_ID", "44"), name("SLURM_JOB_NAME", "t");
  EXPECT_THROW_WITH(Fabric({.accelerator = "cpu", .devices = 2}), "srun --ntasks-per-node=2 --mpi=pmix");
}

// srun --gpus-per-task=1: each task sees one GPU (its own) where the node runs
// several ranks, so each rank's device is index 0 of what it sees.
TEST(Options, EachTaskUsesTheGpuSrunGaveIt) {
  using fabric::per_task_devices;
  const auto cuda = c10::DeviceType::CUDA;
  for (const fabric::Devices& devices : {fabric::Devices(), fabric::Devices(4), fabric::Devices(-1)}) {
    auto own = per_task_devices(devices, 4, 1, cuda);
    ASSERT_TRUE(own.has_value()) << devices.str();
    ASSERT_EQ(own->size(), 4u);
    for (const auto& d : *own) EXPECT_EQ(d, c10::Device(cuda, 0));
  }
  // The task sees the node's GPUs (--gpus-per-node): parsed as usual, by local rank.
  EXPECT_FALSE(per_task_devices(fabric::Devices(), 4, 4, cuda).has_value());
  EXPECT_FALSE(per_task_devices(fabric::Devices({0, 1}), 4, 1, cuda).has_value());
  EXPECT_FALSE(per_task_devices(fabric::Devices(2), 4, 1, cuda).has_value());
  EnvGuard cvd("CUDA_VISIBLE_DEVICES", "2,3");
  EXPECT_THROW_WITH(per_task_devices(fabric::Devices(), 4, 2, cuda), "sees 2 GPUs (CUDA_VISIBLE_DEVICES=2,3)",
                    "--gpus-per-task=1", "--gpus-per-node=4");
}

// A one-node mpirun job's rendezvous port is never inside the ephemeral range:
// there a rank 1 retrying connect() before rank 0 listens can be given the very
// port as its own source port and connect to itself (the hang of a CI run).
TEST(Options, JobRendezvousPortsAvoidTheEphemeralRange) {
  int low = 32768, high = 60999;
  std::ifstream("/proc/sys/net/ipv4/ip_local_port_range") >> low >> high;
  for (const auto& [lo, hi] : std::vector<std::pair<int, int>>{{low, high}, {32768, 60999}, {1024, 60000}}) {
    std::set<int> seen;
    for (long job = 0; job < 200000; job += 997) {
      const int port = fabric::strategies::job_rendezvous_port(job * 65536 + 1, lo, hi);
      EXPECT_TRUE(port < lo || port > hi) << "job " << job << ": port " << port << " in " << lo << "-" << hi;
      EXPECT_GE(port, 1024);
      EXPECT_LE(port, 65535);
      seen.insert(port);
    }
    EXPECT_GT(seen.size(), 150u) << "ports of different jobs should differ";
  }
  // No room either side: the old spread, documented as the last resort.
  EXPECT_EQ(fabric::strategies::job_rendezvous_port(5, 1100, 65000), 20005);
}

TEST(Options, TorchrunTakesPrecedenceOverMpiAndSlurm) {
  EnvGuard rank("RANK", "1"), size("WORLD_SIZE", "2"), ompi("OMPI_COMM_WORLD_SIZE", "8"),
      slurm("SLURM_NTASKS", "16"), procid("SLURM_PROCID", "0"), step("SLURM_STEP_ID", "0"),
      addr("MASTER_ADDR", "10.0.0.1"),
      port("MASTER_PORT", "70000");
  EXPECT_THROW_WITH(fabric::launchers::detect_cluster_environment(), "MASTER_PORT=70000");
  EnvGuard good_port("MASTER_PORT", "29555");
  auto env = fabric::launchers::detect_cluster_environment();
  EXPECT_EQ(env.kind, "torchrun");
  EXPECT_EQ(env.world_size, 2);
  EXPECT_EQ(env.main_address, "10.0.0.1");
  EXPECT_EQ(env.main_port, 29555);
}

namespace {

// In a forked child (so this process's malloc is left as it is): `setup` runs, then
// 20 rounds of allocating, touching and freeing 8 blocks of 4 MiB, as a training
// step does with its activations. Returns the minor page faults of rounds 3-20, or
// -1 - setup's result when setup returned nonzero.
long faults_reusing_freed_blocks(int (*setup)()) {
  int fds[2];
  if (pipe(fds) != 0) return -100;
  const pid_t pid = fork();
  if (pid == 0) {
    close(fds[0]);
    long out = 0;
    if (const int code = setup(); code != 0) {
      out = -1 - code;
    } else {
      long before = 0;
      for (int round = 0; round < 20; ++round) {
        if (round == 2) {
          rusage usage{};
          getrusage(RUSAGE_SELF, &usage);
          before = usage.ru_minflt;
        }
        void* blocks[8];
        for (auto& block : blocks) {
          block = std::malloc(4 << 20);
          std::memset(block, round, 4 << 20);
          asm volatile("" : : "r"(block) : "memory");  // the stores must happen
        }
        for (auto* block : blocks) std::free(block);
      }
      rusage usage{};
      getrusage(RUSAGE_SELF, &usage);
      out = usage.ru_minflt - before;
    }
    (void)!write(fds[1], &out, sizeof(out));
    _exit(0);
  }
  close(fds[1]);
  long faults = -200;
  pollfd ready{fds[0], POLLIN, 0};
  if (poll(&ready, 1, 60000) != 1) {  // a child stuck after fork fails the test, not the run
    kill(pid, SIGKILL);
    faults = -400;
  } else if (read(fds[0], &faults, sizeof(faults)) != sizeof(faults)) {
    faults = -300;
  }
  close(fds[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  return faults;
}

}  // namespace

TEST(Options, FabricKeepsFreedCpuMemoryForTheNextStep) {
#if !defined(__GLIBC__)
  GTEST_SKIP() << "the setting is glibc malloc's";
#else
  for (const char* name : {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"}) {
    if (std::getenv(name) != nullptr) GTEST_SKIP() << name << " is set: the user's setting wins";
  }
  // The default: Fabric applies the setting when constructed.
  { fabric::Fabric fabric({.accelerator = "cpu"}); }
  EXPECT_TRUE(fabric::accelerators::freed_cpu_memory_retained());
  // Freed blocks come back without page faults.
  const long retained = faults_reusing_freed_blocks(
      [] { return fabric::accelerators::retain_freed_cpu_memory() ? 0 : 1; });
  EXPECT_GE(retained, 0);
  EXPECT_LT(retained, 2000);
  // The control: with glibc's initial thresholds fixed (128 KiB, what it starts
  // from) every 4 MiB block is mapped afresh, 18 rounds x 8 x 1024 pages.
  const long handed_back = faults_reusing_freed_blocks([] {
    return mallopt(M_MMAP_THRESHOLD, 128 << 10) == 1 && mallopt(M_TRIM_THRESHOLD, 128 << 10) == 1 ? 0 : 1;
  });
  EXPECT_GT(handed_back, 50000) << "the measurement sees no page faults at all";
  // A user's own MALLOC_*_ setting wins and the call says it changed nothing.
  const long refused = faults_reusing_freed_blocks([] {
    setenv("MALLOC_TRIM_THRESHOLD_", "131072", 1);
    return fabric::accelerators::retain_freed_cpu_memory() ? 1 : 0;
  });
  EXPECT_GE(refused, 0) << "retain_freed_cpu_memory() applied despite MALLOC_TRIM_THRESHOLD_";
#endif
}
