// Stall detection for the mpi backend, whose calls otherwise block forever: a
// collective that has not completed on this rank within `timeout` ends the job
// with a report naming the collective, its sequence number and the ranks that had
// not entered it (Horovod's stall check, NCCL's watchdog). Collectives stay the
// blocking, tuned MPI calls; the watchdog only watches. Its thread wakes every
// poll_interval(); to learn where the other ranks are it asks their watchdogs
// through the rendezvous store (each polls one key), so a rank whose own code is
// stuck outside any collective still answers. Sequence numbers count the
// collectives issued on the process group, 1, 2, ..., the same on every rank
// since every rank must issue them in the same order.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <thread>

#include <torch/csrc/distributed/c10d/Store.hpp>

namespace fabric::strategies {

struct CollectiveWatchdogOptions {
  std::chrono::milliseconds timeout = std::chrono::minutes(10);  // must be > 0
  int rank = 0;
  int world_size = 1;
  // The rendezvous store (the watchdog keys its own names); null: the report
  // cannot say where the other ranks are.
  c10::intrusive_ptr<c10d::Store> store;
  // Called once, on the watchdog's thread, with the report. Default: print it to
  // stderr and end this process with status 1 (its launcher then ends the rest).
  std::function<void(const std::string& report)> on_stall;
};

class CollectiveWatchdog {
 public:
  explicit CollectiveWatchdog(CollectiveWatchdogOptions options);
  ~CollectiveWatchdog();
  CollectiveWatchdog(const CollectiveWatchdog&) = delete;
  CollectiveWatchdog& operator=(const CollectiveWatchdog&) = delete;

  // The program issued collective `op` ("allreduce", ...): its sequence number.
  // `op` must outlive the watchdog (a string literal): it is kept, not copied,
  // since these calls sit on every collective's path.
  int64_t issued(const char* op);
  // The backend's worker entered collective `seq` / it completed on this rank.
  void started(int64_t seq, const char* op);
  void finished(int64_t seq);

  // timeout / 10, within [50 ms, 5 s]: how often the thread looks (and answers).
  std::chrono::milliseconds poll_interval() const;

 private:
  struct State {
    int64_t issued = 0, running = 0;
    const char* issued_op = "";
    const char* running_op = "";
    std::chrono::steady_clock::time_point since;
  };
  void loop();
  void answer(const State& state);
  std::string report(const State& state);

  CollectiveWatchdogOptions options_;
  std::mutex mutex_;
  std::condition_variable cv_;
  State state_;
  bool stop_ = false;
  bool store_usable_ = true;  // false once the store failed (rank 0 gone)
  std::thread thread_;
};

}  // namespace fabric::strategies
