// CollectiveWatchdog (strategies/collective_watchdog.h) in one process: the
// watchdogs of several "ranks" share an in-memory c10d store, and each records its
// report instead of ending the process. The mpi backend's use of it, under a real
// mpirun, is in ddp_test.cpp (Ddp.ARankThatSkipsABarrier...).
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include <gtest/gtest.h>
#include <torch/csrc/distributed/c10d/HashStore.hpp>

#include "strategies/collective_watchdog.h"

namespace {

using fabric::strategies::CollectiveWatchdog;
using fabric::strategies::CollectiveWatchdogOptions;
using namespace std::chrono_literals;

// One rank's watchdog, whose report lands here.
struct Rank {
  Rank(int rank, int world, c10::intrusive_ptr<c10d::Store> store, std::chrono::milliseconds timeout) {
    CollectiveWatchdogOptions o;
    o.timeout = timeout;
    o.rank = rank;
    o.world_size = world;
    o.store = std::move(store);
    o.on_stall = [this](const std::string& text) {
      std::lock_guard<std::mutex> lock(mutex);
      report = text;
      cv.notify_all();
    };
    watchdog = std::make_unique<CollectiveWatchdog>(std::move(o));
  }
  // The report, once there is one (nullopt after `wait`).
  std::optional<std::string> wait_report(std::chrono::milliseconds wait) {
    std::unique_lock<std::mutex> lock(mutex);
    cv.wait_for(lock, wait, [this] { return report.has_value(); });
    return report;
  }
  // A collective issued and completed at once.
  void complete(const char* op) {
    const auto seq = watchdog->issued(op);
    watchdog->started(seq, op);
    watchdog->finished(seq);
  }
  std::mutex mutex;
  std::condition_variable cv;
  std::optional<std::string> report;
  std::unique_ptr<CollectiveWatchdog> watchdog;
};

TEST(CollectiveWatchdog, NamesTheCollectiveAndTheRanksThatHadNotEnteredIt) {
  auto store = c10::make_intrusive<c10d::HashStore>();
  Rank r0(0, 3, store, 300ms), r1(1, 3, store, 300ms), r2(2, 3, store, 300ms);
  for (Rank* r : {&r0, &r1, &r2}) r->complete("allreduce");  // #1 everywhere
  // Ranks 0 and 2 wait in barrier #2; rank 1 is busy elsewhere and never issues it.
  const auto start = std::chrono::steady_clock::now();
  for (Rank* r : {&r0, &r2}) r->watchdog->started(r->watchdog->issued("barrier"), "barrier");
  auto report = r0.wait_report(10s);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ASSERT_TRUE(report.has_value()) << "no report within 10 s";
  EXPECT_GE(seconds, 0.3);
  EXPECT_LT(seconds, 5.0);
  EXPECT_NE(report->find("collective barrier #2 has not completed within collective_timeout (0.3 s) "
                         "on rank 0 of 3"), std::string::npos) << *report;
  EXPECT_NE(report->find("rank(s) 1 had not entered it"), std::string::npos) << *report;
  EXPECT_NE(report->find("waiting in it: rank(s) 0, 2"), std::string::npos) << *report;
  EXPECT_NE(report->find("rank 1 is in none; its last was allreduce #1"), std::string::npos) << *report;
  EXPECT_FALSE(r1.wait_report(0ms).has_value()) << "rank 1 waits in no collective: it reports nothing";
}

TEST(CollectiveWatchdog, ACollectiveThatCompletesInTimeIsNoStall) {
  auto store = c10::make_intrusive<c10d::HashStore>();
  Rank r0(0, 2, store, 400ms), r1(1, 2, store, 400ms);
  // A slow rank: rank 0 waits 250 ms in each of three all-reduces, under the timeout.
  for (int i = 0; i < 3; ++i) {
    const auto seq = r0.watchdog->issued("allreduce");
    r0.watchdog->started(seq, "allreduce");
    std::this_thread::sleep_for(250ms);
    r1.complete("allreduce");
    r0.watchdog->finished(seq);
  }
  EXPECT_FALSE(r0.wait_report(600ms).has_value()) << *r0.report;
  EXPECT_FALSE(r1.report.has_value()) << *r1.report;
}

TEST(CollectiveWatchdog, TellsRanksInAnotherCollectiveAndRanksThatDoNotAnswer) {
  auto store = c10::make_intrusive<c10d::HashStore>();
  // Rank 2 has no watchdog (dead, or stopped): it never answers.
  Rank r0(0, 3, store, 300ms), r1(1, 3, store, 5s);
  for (Rank* r : {&r0, &r1}) r->complete("allreduce");
  r0.watchdog->started(r0.watchdog->issued("allreduce"), "allreduce");   // #2
  r1.watchdog->started(r1.watchdog->issued("broadcast"), "broadcast");   // #2, in a different order
  auto report = r0.wait_report(10s);
  ASSERT_TRUE(report.has_value());
  EXPECT_NE(report->find("collective allreduce #2"), std::string::npos) << *report;
  EXPECT_NE(report->find("rank 1 is in broadcast #2 instead"), std::string::npos) << *report;
  EXPECT_NE(report->find("rank(s) 2 did not answer"), std::string::npos) << *report;
  EXPECT_EQ(report->find("had not entered"), std::string::npos) << *report;
}

TEST(CollectiveWatchdog, WithoutAStoreItStillEndsTheWait) {
  CollectiveWatchdogOptions o;
  o.timeout = 200ms;
  o.world_size = 2;
  std::mutex mutex;
  std::condition_variable cv;
  std::string report;
  o.on_stall = [&](const std::string& text) {
    std::lock_guard<std::mutex> lock(mutex);
    report = text;
    cv.notify_all();
  };
  CollectiveWatchdog watchdog(o);
  watchdog.started(watchdog.issued("all_gather_into_tensor"), "all_gather_into_tensor");
  std::unique_lock<std::mutex> lock(mutex);
  ASSERT_TRUE(cv.wait_for(lock, 10s, [&] { return !report.empty(); }));
  EXPECT_NE(report.find("collective all_gather_into_tensor #1 has not completed"), std::string::npos) << report;
  EXPECT_NE(report.find("where the other ranks are is unknown"), std::string::npos) << report;
}

TEST(CollectiveWatchdog, RefusesATimeoutThatIsNotPositive) {
  CollectiveWatchdogOptions o;
  o.timeout = 0ms;
  try {
    CollectiveWatchdog watchdog(o);
    FAIL() << "a zero timeout was accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("the timeout must be positive"), std::string::npos) << e.what();
  }
}

}  // namespace
