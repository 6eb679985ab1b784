// Jobs on a real SLURM cluster: munged, slurmctld and slurmd started on this
// machine by scripts/slurm_cluster.sh in a temporary folder (one node, MpiDefault
// none) and stopped by their pids after the suite. Ranks started by
// `srun --mpi=pmix` (direct launch: no mpirun) form one MPI world and train to the
// weights of the same job under mpirun, from srun and from an sbatch script;
// srun without PMIx fails saying what works; a task killed mid-run ends the step
// naming its rank; scancel ends every rank. Where the daemons cannot start (no
// root, packages missing) every case is skipped with the reason. SlurmTwoHosts puts
// one slurmd in each simulated host of scripts/two_hosts.sh for a 2-node job.
#include <gtest/gtest.h>

#include <chrono>
#include <csignal>
#include <cstdlib>
#include <fstream>
#include <string>
#include <thread>
#include <unistd.h>
#include <vector>

#include "checkpoint/checkpoint.h"
#include "checkpoint/filesystem.h"
#include "host_test_util.h"
#include "mpi_test_util.h"
#include "test_util.h"

namespace {

std::string g_cluster_dir, g_skip_reason;

// The same intra-op threads under both launchers: by default mpirun's ranks get 1
// here and srun's tasks 2 (all the cores they may use), and matmuls that split
// differently round differently. sbatch and srun pass the variable on.
const std::string kThreads = "OMP_NUM_THREADS=1 ";

// A command's output and status; nothing runs past `limit` seconds.
testutil::CommandResult run(const std::string& command, int limit = 180) {
  return testutil::run_command("timeout -k 5 " + std::to_string(limit) + " sh -c '" + command + "' 2>&1");
}

std::string fresh_dir(const std::string& name) {
  const std::string dir = ::testing::TempDir() + "/slurm_" + name;
  fabric::fs::remove_all(dir);
  fabric::fs::make_directories(dir);
  return dir;
}

bool alive(pid_t pid) { return pid > 0 && ::kill(pid, 0) == 0; }

pid_t wait_for_pid(const std::string& file, int seconds) {
  for (int i = 0; i < seconds * 10 && !fabric::fs::exists(file); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // written in full
  pid_t pid = 0;
  std::ifstream(file) >> pid;
  return pid;
}

bool ended_within(pid_t pid, int seconds) {
  for (int i = 0; i < seconds * 10 && alive(pid); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return !alive(pid);
}

void expect_same_tensors(const std::vector<torch::Tensor>& expected, const std::vector<torch::Tensor>& got,
                         const std::string& what) {
  ASSERT_FALSE(expected.empty()) << what;
  ASSERT_EQ(got.size(), expected.size()) << what;
  for (size_t i = 0; i < got.size(); ++i) {
    // The same ranks doing the same work: equal up to the reduction's rounding.
    EXPECT_TRUE(torch::allclose(got[i], expected[i], 1e-5, 1e-6))
        << what << ": tensor " << i << " max diff "
        << (got[i].to(torch::kDouble) - expected[i].to(torch::kDouble)).abs().max().item<double>();
  }
}

class Slurm : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (hosttest::g_slurm_cluster.empty()) {
      g_skip_reason = "no scripts/slurm_cluster.sh given";
      return;
    }
    // Short, under /tmp: munge's and slurmd's sockets live in it, and a socket's
    // path has at most 107 characters (Bazel's TEST_TMPDIR is longer).
    char dir[] = "/tmp/tfslurm.XXXXXX";
    if (!::mkdtemp(dir)) {
      g_skip_reason = "FAILED: cannot create a folder under /tmp for the cluster";
      return;
    }
    g_cluster_dir = dir;
    auto up = run(hosttest::g_slurm_cluster + " up " + g_cluster_dir, 60);
    if (up.status == 77) {
      g_skip_reason = "no SLURM cluster here: " + up.output;
    } else if (up.status != 0) {
      g_skip_reason = "FAILED: " + up.output;
    } else {
      ::setenv("SLURM_CONF", (g_cluster_dir + "/slurm.conf").c_str(), 1);
    }
  }
  // Stops the daemons by their pids, also after failed tests.
  static void TearDownTestSuite() {
    if (g_cluster_dir.empty()) return;
    auto down = run(hosttest::g_slurm_cluster + " down " + g_cluster_dir, 60);
    EXPECT_EQ(down.status, 0) << down.output;
    for (const char* daemon : {"slurmd", "slurmctld", "munged"}) {
      EXPECT_FALSE(fabric::fs::exists(g_cluster_dir + "/" + daemon + ".pid")) << daemon << " was not stopped";
    }
    if (down.status == 0) fabric::fs::remove_all(g_cluster_dir);
    ::unsetenv("SLURM_CONF");
  }
  void SetUp() override {
    if (g_skip_reason.rfind("FAILED: ", 0) == 0) FAIL() << "the cluster did not start: " << g_skip_reason;
    if (!g_skip_reason.empty()) GTEST_SKIP() << g_skip_reason;
  }
};

}  // namespace

// srun --mpi=pmix starts the ranks itself (no mpirun): they form one MPI world,
// devices='auto' follows --ntasks-per-node, and DDP ends with the weights of
// the same job under mpirun.
TEST_F(Slurm, SrunWithPmixTrainsAsMpirun) {
  const auto under_mpirun = fresh_dir("mpirun");
  auto reference = run(kThreads + testutil::mpirun(2) + " " + hosttest::g_ddp_worker + " train " + under_mpirun);
  ASSERT_EQ(reference.status, 0) << reference.output;
  const auto under_srun = fresh_dir("srun");
  auto job = run(kThreads + "srun --mpi=pmix --ntasks-per-node=2 -N 1 " + hosttest::g_ddp_worker + " train " +
                 under_srun);
  ASSERT_EQ(job.status, 0) << job.output;
  hosttest::expect_same_params(under_mpirun, under_srun, 2);
}

// A batch script as users write it (#SBATCH lines, srun inside) trains the
// custom_trainer example to the checkpoint the same job writes under mpirun. So
// does the program run in the script itself with --devices 2: the script is not
// one of the job's tasks, and the program starts its ranks (through mpirun).
TEST_F(Slurm, AnSbatchScriptWithSrunEqualsTheJobUnderMpirun) {
  if (hosttest::g_custom_trainer.empty()) GTEST_SKIP() << "no custom_trainer given";
  const auto dir = fresh_dir("sbatch");
  const std::string flags = " --max-steps 30 --checkpoint-every 0 --val-every 0 --logger none"
                            " --batch-size 32 --strategy ddp";
  auto reference = run("cd " + dir + " && " + kThreads + testutil::mpirun(2) + " " + hosttest::g_custom_trainer + flags +
                       " --checkpoint-dir " + dir + "/a --checkpoint " + dir + "/a.pt");
  ASSERT_EQ(reference.status, 0) << reference.output;
  std::ofstream(dir + "/train.sbatch") << "#!/bin/bash\n"
                                          "#SBATCH --job-name=train\n"
                                          "#SBATCH --nodes=1\n"
                                          "#SBATCH --ntasks-per-node=2\n"
                                          "#SBATCH --output=" << dir << "/train.out\n"
                                          "srun --mpi=pmix " << hosttest::g_custom_trainer << flags
                                       << " --checkpoint-dir " << dir << "/b --checkpoint " << dir << "/b.pt\n"
                                       // the script itself is no task: the program starts its ranks
                                       << hosttest::g_custom_trainer << flags << " --devices 2 --checkpoint-dir "
                                       << dir << "/c --checkpoint " << dir << "/c.pt\n";
  auto job = run("cd " + dir + " && " + kThreads + "sbatch --wait train.sbatch");
  const std::string said = testutil::read_file(dir + "/train.out");
  ASSERT_EQ(job.status, 0) << job.output << said;
  std::vector<torch::Tensor> a, b, c;
  hosttest::collect_tensors(fabric::read_checkpoint(dir + "/a.pt"), a);
  hosttest::collect_tensors(fabric::read_checkpoint(dir + "/b.pt"), b);
  expect_same_tensors(a, b, "sbatch + srun against mpirun");
  ASSERT_TRUE(fabric::fs::exists(dir + "/c.pt")) << said;
  hosttest::collect_tensors(fabric::read_checkpoint(dir + "/c.pt"), c);
  expect_same_tensors(a, c, "--devices 2 run in the batch script against mpirun");
}

// A cluster whose MpiDefault is none, and srun without --mpi=pmix: Open MPI
// cannot join the tasks, and every rank says so with the two ways that work,
// at once (nobody waits for a rendezvous).
TEST_F(Slurm, SrunWithoutPmixFailsSayingWhatWorks) {
  const auto dir = fresh_dir("nopmix");
  const auto start = std::chrono::steady_clock::now();
  auto job = run("srun -n 2 " + hosttest::g_ddp_worker + " train " + dir, 120);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_NE(job.status, 0) << job.output;
  EXPECT_LT(seconds, 60.0) << job.output;
  EXPECT_NE(job.output.find("srun started these 2 tasks without PMIx"), std::string::npos) << job.output;
  EXPECT_NE(job.output.find("Add --mpi=pmix to srun"), std::string::npos) << job.output;
  EXPECT_NE(job.output.find("mpirun PROGRAM in the sbatch script"), std::string::npos) << job.output;
}

// SIGKILL to one task mid-run ends the whole step promptly, not 0, and the
// output names the rank (srun's task number is the rank); no rank is left.
TEST_F(Slurm, AKilledTaskEndsTheStepNamingItsRank) {
  const auto dir = fresh_dir("kill");
  testutil::CommandResult job;
  std::thread runner([&] { job = run("srun --mpi=pmix -n 2 " + hosttest::g_ddp_worker + " slow " + dir, 120); });
  const pid_t rank1 = wait_for_pid(dir + "/pid_rank1", 60), rank0 = wait_for_pid(dir + "/pid_rank0", 5);
  if (rank1 <= 0 || rank0 <= 0) {
    runner.join();
    FAIL() << "the ranks never started: " << job.output;
  }
  const auto killed_at = std::chrono::steady_clock::now();
  ::kill(rank1, SIGKILL);
  runner.join();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - killed_at).count();
  std::printf("  the step ended %.1f s after the kill\n", seconds);
  EXPECT_LT(seconds, 40.0) << job.output;
  EXPECT_NE(job.status, 0) << job.output;
  EXPECT_NE(job.output.find("task 1"), std::string::npos) << job.output;
  EXPECT_TRUE(ended_within(rank0, 10)) << "rank 0 (pid " << rank0 << ") outlived the step";
}

// scancel of a batch job ends every rank of its srun step.
TEST_F(Slurm, ScancelEndsEveryRank) {
  const auto dir = fresh_dir("scancel");
  std::ofstream(dir + "/slow.sbatch") << "#!/bin/bash\n"
                                         "#SBATCH --ntasks-per-node=2\n"
                                         "#SBATCH --output=" << dir << "/slow.out\n"
                                         "srun --mpi=pmix " << hosttest::g_ddp_worker << " slow " << dir << "\n";
  auto submitted = run("sbatch --parsable " + dir + "/slow.sbatch", 30);
  ASSERT_EQ(submitted.status, 0) << submitted.output;
  const std::string job_id = submitted.output.substr(0, submitted.output.find_first_of(";\n"));
  const pid_t rank0 = wait_for_pid(dir + "/pid_rank0", 60), rank1 = wait_for_pid(dir + "/pid_rank1", 10);
  if (rank0 <= 0 || rank1 <= 0) {
    run("scancel " + job_id, 30);
    FAIL() << "the ranks never started: " << testutil::read_file(dir + "/slow.out");
  }
  auto cancel = run("scancel " + job_id, 30);
  ASSERT_EQ(cancel.status, 0) << cancel.output;
  EXPECT_TRUE(ended_within(rank0, 20)) << "rank 0 still runs after scancel";
  EXPECT_TRUE(ended_within(rank1, 20)) << "rank 1 still runs after scancel";
  bool gone = false;
  for (int i = 0; i < 100 && !gone; ++i) {
    gone = run("squeue -h -j " + job_id + " -o %i", 30).output.find(job_id) == std::string::npos;
    if (!gone) std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  EXPECT_TRUE(gone) << "job " << job_id << " is still in the queue";
}

namespace {

// Two nodes: one slurmd in each simulated host of scripts/two_hosts.sh (tfnode1
// on hostA with slurmctld, tfnode2 on hostB), their names known to neither host.
class SlurmTwoHosts : public ::testing::Test {
 protected:
  void SetUp() override {
    if (hosttest::g_slurm_cluster.empty()) GTEST_SKIP() << "no scripts/slurm_cluster.sh given";
    auto hosts = run(hosttest::g_script + " up", 60);
    if (hosts.status == 77) GTEST_SKIP() << "no two-host test bed here: " << hosts.output;
    ASSERT_EQ(hosts.status, 0) << hosts.output;
    hosts_up_ = true;
    char dir[] = "/tmp/tfslurm2.XXXXXX";
    ASSERT_NE(::mkdtemp(dir), nullptr);
    dir_ = dir;
    auto up = run("TWO_HOSTS_SH=" + hosttest::g_script + " " + hosttest::g_slurm_cluster + " up " + dir_ +
                  " --two-hosts", 60);
    if (up.status == 77) GTEST_SKIP() << "no two-node SLURM cluster here: " << up.output;
    ASSERT_EQ(up.status, 0) << up.output;
  }
  void TearDown() override {
    if (!dir_.empty()) {
      auto down = run("TWO_HOSTS_SH=" + hosttest::g_script + " " + hosttest::g_slurm_cluster + " down " + dir_, 60);
      EXPECT_EQ(down.status, 0) << down.output;
      if (down.status == 0) fabric::fs::remove_all(dir_);
    }
    if (hosts_up_) {
      auto down = run(hosttest::g_script + " down", 60);
      EXPECT_EQ(down.status, 0) << down.output;
    }
  }
  // A client command on hostA (where srun and sbatch reach slurmctld).
  std::string on_a(const std::string& command) const {
    return hosttest::g_script + " exec A env SLURM_CONF=" + dir_ + "/slurm.conf " + command;
  }
  std::string dir_;
  bool hosts_up_ = false;
};

}  // namespace

// srun --mpi=pmix -N 2: two ranks on each node form one MPI world across the
// hosts (rank 0 sends its addresses over MPI; the node names resolve nowhere)
// and end with the weights of the same 4-rank job on one host under mpirun.
TEST_F(SlurmTwoHosts, SrunAcrossTwoNodesEqualsTheJobOnOneHost) {
  const auto one = fresh_dir("one_host");
  auto reference = run(kThreads + testutil::mpirun(4) + " " + hosttest::g_ddp_worker + " train " + one);
  ASSERT_EQ(reference.status, 0) << reference.output;
  const auto two = fresh_dir("two_nodes");
  auto job = run(on_a(kThreads + "srun -N 2 --ntasks-per-node=2 --mpi=pmix sh -c \"hostname > " + two +
                      "/host_\\$SLURM_PROCID; exec " + hosttest::g_ddp_worker + " train " + two + "\""));
  ASSERT_EQ(job.status, 0) << job.output;
  hosttest::expect_placement(two, 2);
  hosttest::expect_same_params(one, two, 4);
}
