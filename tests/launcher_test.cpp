// The rank supervision behind Fabric's own spawning of local ranks (CUDA jobs):
// it waits for exactly the ranks it started, reports every rank's failure in the
// job's status, and lets rank 0 wait for the others instead of killing them when
// its own work ends. Ranks here are shell commands, so it runs without a GPU.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <csignal>
#include <stdexcept>
#include <string>
#include <vector>
#include <sys/wait.h>
#include <unistd.h>

#include "launchers/local_ranks.h"
#include "launchers/rank_watch.h"
#include "launchers/restarts.h"
#include "launchers/supervisor.h"
#include "test_util.h"

namespace {

// The variables LocalRanks sets for rank 0, restored after each test.
struct RankEnvironmentGuard {
  testutil::EnvGuard a{"RANK", std::nullopt}, b{"LOCAL_RANK", std::nullopt},
      c{"WORLD_SIZE", std::nullopt}, d{"LOCAL_WORLD_SIZE", std::nullopt},
      e{"NODE_RANK", std::nullopt}, f{"GROUP_RANK", std::nullopt},
      g{"MASTER_ADDR", std::nullopt}, h{"MASTER_PORT", std::nullopt};
};

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

// waitpid(-1) used to reap the program's own children too; system()/pclose()
// then failed with ECHILD.
TEST(Launcher, SupervisorLeavesOtherChildrenAlone) {
  const pid_t own = ::fork();
  ASSERT_GE(own, 0);
  if (own == 0) {
    ::usleep(100 * 1000);
    ::_exit(7);
  }
  fabric::launchers::Supervisor supervisor;
  supervisor.start(1, {"sh", "-c", "sleep 0.4"}, {});
  EXPECT_EQ(supervisor.wait_all(), 0);
  int status = 0;
  ASSERT_EQ(::waitpid(own, &status, 0), own) << "the supervisor reaped a child it did not start";
  EXPECT_EQ(WEXITSTATUS(status), 7);
}

TEST(Launcher, RankZeroWaitsForTheOtherRanks) {
  RankEnvironmentGuard env;
  const auto start = std::chrono::steady_clock::now();
  int failures = 0;
  {
    fabric::launchers::LocalRanks ranks(3, {"sh", "-c", "sleep 0.5; test \"$WORLD_SIZE\" = 3"},
                                        [&](int) { ++failures; });
    EXPECT_STREQ(std::getenv("RANK"), "0");
    EXPECT_STREQ(std::getenv("WORLD_SIZE"), "3");
  }  // the destructor waits
  EXPECT_GE(seconds_since(start), 0.45) << "rank 0 did not wait for ranks 1 and 2";
  EXPECT_EQ(failures, 0);
}

// One launcher per node (one srun task per node on GPUs): the ranks it starts
// are this node's, numbered after the nodes before it, and meet at the main
// node's address and port, not on loopback.
TEST(Launcher, ANodesLauncherNumbersItsRanksAfterTheNodesBeforeIt) {
  RankEnvironmentGuard env;
  const std::string out = ::testing::TempDir() + "/node_launch_env";
  std::remove(out.c_str());
  {
    fabric::launchers::LocalRanks ranks(
        2, {"sh", "-c", "echo $RANK $LOCAL_RANK $WORLD_SIZE $LOCAL_WORLD_SIZE $NODE_RANK $MASTER_ADDR $MASTER_PORT > " + out},
        {}, {3, 2, "node07", 15123});
    EXPECT_STREQ(std::getenv("RANK"), "4");
    EXPECT_STREQ(std::getenv("LOCAL_RANK"), "0");
    EXPECT_STREQ(std::getenv("WORLD_SIZE"), "6");
    EXPECT_STREQ(std::getenv("NODE_RANK"), "2");
    EXPECT_STREQ(std::getenv("MASTER_ADDR"), "node07");
    EXPECT_STREQ(std::getenv("MASTER_PORT"), "15123");
  }
  EXPECT_EQ(testutil::read_file(out), "5 1 6 2 2 node07 15123\n");
}

// Rank 0 throws (and its Fabric, inside the try, is destroyed on the way to the
// handler): the ranks it started cannot finish without it and must not wait
// for their collective timeout. They are stopped at once, also one that ignores
// SIGTERM (SIGKILL after the grace period), and the exception reaches the handler.
TEST(Launcher, RankZeroEndingWithAnExceptionStopsTheRanksItStarted) {
  RankEnvironmentGuard env;
  std::vector<int> pids;
  int failures = 0;
  bool caught = false;
  const auto start = std::chrono::steady_clock::now();
  try {
    fabric::launchers::LocalRanks ranks(
        3, {"sh", "-c", "if [ \"$RANK\" = 2 ]; then trap '' TERM; fi; exec sleep 600"},
        [&](int) { ++failures; });
    pids = ranks.pids();
    ::usleep(200 * 1000);
    throw std::runtime_error("rank 0 failed");
  } catch (const std::runtime_error& e) {
    caught = std::string(e.what()) == "rank 0 failed";
  }
  EXPECT_TRUE(caught);
  EXPECT_LT(seconds_since(start), 20.0) << "rank 0 waited for ranks that wait for it";
  ASSERT_EQ(pids.size(), 2u);
  for (int pid : pids) EXPECT_NE(::kill(pid, 0), 0) << "pid " << pid << " still exists";
  EXPECT_EQ(failures, 0) << "the failure handler ran for ranks stopped on purpose";
}

TEST(Launcher, AFailingRankStopsTheOthersAndGivesItsStatus) {
  RankEnvironmentGuard env;
  int reported = -1;
  const auto start = std::chrono::steady_clock::now();
  fabric::launchers::LocalRanks ranks(
      3, {"sh", "-c", "if [ \"$RANK\" = 1 ]; then exit 5; fi; sleep 30"},
      [&](int status) { reported = status; });
  EXPECT_EQ(ranks.join(), 5);
  EXPECT_EQ(reported, 5);
  EXPECT_LT(seconds_since(start), 20) << "rank 2 was not stopped";
}

// The restart loop: the count each attempt sees, the stop after max_restarts,
// and what a restart says.
TEST(Restarts, EachAttemptSeesItsCountAndTheLoopStopsAtTheLimit) {
  testutil::EnvGuard a{"FABRIC_RESTART_COUNT", std::nullopt}, b{"TORCHELASTIC_RESTART_COUNT", std::nullopt},
      c{"TORCHELASTIC_MAX_RESTARTS", std::nullopt};
  std::vector<std::string> seen;
  int attempts = 0;
  const int status = fabric::launchers::run_with_restarts(3, "test", [&] {
    seen.push_back(std::string(std::getenv("FABRIC_RESTART_COUNT")) + "/" +
                   std::getenv("TORCHELASTIC_RESTART_COUNT") + "/" + std::getenv("TORCHELASTIC_MAX_RESTARTS"));
    EXPECT_EQ(fabric::launchers::restart_count(), attempts);
    return fabric::launchers::AttemptOutcome{++attempts < 3 ? 137 : 0, "rank 1 was killed"};
  });
  EXPECT_EQ(status, 0);
  EXPECT_EQ(seen, std::vector<std::string>({"0/0/3", "1/1/3", "2/2/3"}));
  attempts = 0;
  testing::internal::CaptureStderr();
  const int failed = fabric::launchers::run_with_restarts(1, "test", [&] {
    ++attempts;
    return fabric::launchers::AttemptOutcome{3, ""};
  });
  const std::string said = testing::internal::GetCapturedStderr();
  EXPECT_EQ(failed, 3);
  EXPECT_EQ(attempts, 2);
  EXPECT_NE(said.find("test: attempt 1 of 2 failed (exit status 3); restarting every rank as attempt 2 "
                      "(FABRIC_RESTART_COUNT=1)"), std::string::npos) << said;
  EXPECT_NE(said.find("test: attempt 2 of 2 failed (exit status 3); no restarts left (max_restarts=1), "
                      "exiting with status 3"), std::string::npos) << said;
  EXPECT_THROW_WITH(fabric::launchers::run_with_restarts(-1, "test", [] { return fabric::launchers::AttemptOutcome{}; }),
                    "max_restarts=-1 is not supported", "0 (no restarts) or more");
  testutil::EnvGuard bad{"FABRIC_RESTART_COUNT", std::string("two")};
  EXPECT_THROW_WITH(fabric::launchers::restart_count(), "FABRIC_RESTART_COUNT='two'");
}

// What Open MPI 4.1's mpirun prints when a rank of its job dies (verbatim).
TEST(Restarts, MpirunsReportNamesTheRankThatEndedTheJob) {
  EXPECT_EQ(fabric::launchers::mpirun_failure(
                "--------\nmpirun noticed that process rank 1 with PID 0 on node vm exited on signal 9 (Killed).\n"),
            "rank 1 on vm was killed by signal 9 (Killed)");
  EXPECT_EQ(fabric::launchers::mpirun_failure(
                "mpirun detected that one or more processes exited with non-zero status, thus causing\n"
                "the job to be terminated. The first process to do so was:\n\n  Process name: [[29264,1],3]\n"
                "  Exit code:    7\n--------\n"),
            "rank 3 exited with status 7");
  EXPECT_EQ(fabric::launchers::mpirun_failure("nothing about ranks"), "");
  // A real mpirun does not always print either report (launchers/rank_watch.h):
  // the restart loops read the rank watchers' lines first, tested with real
  // mpirun jobs in FabricRun.EveryRestartNamesTheRankThatFailedAndHow.
}

// The rank watcher's line, as run_mpirun_attempt finds it among the ranks' output.
TEST(Restarts, TheRankWatchersLineNamesTheRankItsHostAndHowItEnded) {
  using fabric::launchers::watched_rank_failure;
  EXPECT_EQ(watched_rank_failure("step 3\ntorchfabric: rank 1 on node7 was killed by signal 9 (Killed)\nrest"),
            "rank 1 on node7 was killed by signal 9 (Killed)");
  EXPECT_EQ(watched_rank_failure("torchfabric: rank 12 on a.b exited with status 5\n"
                                 "torchfabric: rank 0 on a.b exited with status 1\n"),
            "rank 12 on a.b exited with status 5");
  // Cut before its end (the rest still to be read): not yet a line.
  EXPECT_EQ(watched_rank_failure("torchfabric: rank 1 on node7 exited with status 1"), "");
  EXPECT_EQ(watched_rank_failure("torchfabric: rank 1 on node7 was killed by signal 9 (Kil"), "");
  EXPECT_EQ(watched_rank_failure("nothing about ranks\n"), "");
}
