#include "strategies/collective_watchdog.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <future>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <vector>

namespace fabric::strategies {
namespace {

// Store keys (under the process group's prefix store's "torchfabric/" names).
const std::string kAsk = "torchfabric/watchdog/ask";
std::string answer_key(int rank) { return "torchfabric/watchdog/rank/" + std::to_string(rank); }

std::string seconds_text(std::chrono::milliseconds ms) {
  std::ostringstream out;
  out << ms.count() / 1000.0 << " s";
  return out.str();
}

std::string join(const std::vector<int>& ranks) {
  std::string out;
  for (int r : ranks) out += (out.empty() ? "" : ", ") + std::to_string(r);
  return out;
}

// A rank's answer: what it has issued, and what its worker is in.
struct Answer {
  int64_t issued = 0, running = 0;
  std::string issued_op, running_op;
};

std::string encode(int64_t issued, int64_t running, const std::string& issued_op,
                   const std::string& running_op) {
  return std::to_string(issued) + " " + std::to_string(running) + " " +
         (issued_op.empty() ? "-" : issued_op) + " " + (running_op.empty() ? "-" : running_op);
}

bool decode(const std::vector<uint8_t>& bytes, Answer& a) {
  std::istringstream in(std::string(bytes.begin(), bytes.end()));
  return static_cast<bool>(in >> a.issued >> a.running >> a.issued_op >> a.running_op);
}

}  // namespace

CollectiveWatchdog::CollectiveWatchdog(CollectiveWatchdogOptions options)
    : options_(std::move(options)) {
  if (options_.timeout.count() <= 0) {
    throw std::invalid_argument("CollectiveWatchdog: the timeout must be positive (got " +
                                std::to_string(options_.timeout.count()) + " ms)");
  }
  if (!options_.on_stall) {
    options_.on_stall = [](const std::string& report) {
      std::fprintf(stderr, "%s\n", report.c_str());
      std::fflush(stderr);
      std::_Exit(1);
    };
  }
  thread_ = std::thread([this] { loop(); });
}

CollectiveWatchdog::~CollectiveWatchdog() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

std::chrono::milliseconds CollectiveWatchdog::poll_interval() const {
  return std::clamp<std::chrono::milliseconds>(options_.timeout / 10, std::chrono::milliseconds(50),
                                               std::chrono::seconds(5));
}

int64_t CollectiveWatchdog::issued(const char* op) {
  std::lock_guard<std::mutex> lock(mutex_);
  state_.issued_op = op;
  return ++state_.issued;
}

void CollectiveWatchdog::started(int64_t seq, const char* op) {
  std::lock_guard<std::mutex> lock(mutex_);
  state_.running = seq;
  state_.running_op = op;
  state_.since = std::chrono::steady_clock::now();
}

void CollectiveWatchdog::finished(int64_t seq) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (state_.running == seq) {
    state_.running = 0;
    state_.running_op = "";
  }
}

void CollectiveWatchdog::answer(const State& s) {
  options_.store->set(answer_key(options_.rank), encode(s.issued, s.running, s.issued_op, s.running_op));
}

void CollectiveWatchdog::loop() {
  bool answered = false;
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    cv_.wait_for(lock, poll_interval(), [this] { return stop_; });
    if (stop_) return;
    const State state = state_;
    lock.unlock();
    if (state.running != 0 && std::chrono::steady_clock::now() - state.since >= options_.timeout) {
      options_.on_stall(report(state));
      return;
    }
    // Another rank's watchdog asks where this one is (answered once: a stall ends the job).
    if (options_.store && store_usable_ && !answered) {
      try {
        if (options_.store->check({kAsk})) {
          answer(state);
          answered = true;
        }
      } catch (const std::exception&) {
        store_usable_ = false;  // rank 0 (the store) has gone: the job is ending anyway
      }
    }
    lock.lock();
  }
}

std::string CollectiveWatchdog::report(const State& state) {
  const int64_t seq = state.running;
  const std::string op = state.running_op;
  std::ostringstream out;
  out << "torchfabric: collective " << op << " #" << seq << " has not completed within collective_timeout ("
      << seconds_text(options_.timeout) << ") on rank " << options_.rank << " of " << options_.world_size;

  // Ask every rank's watchdog (they poll kAsk) and wait two of their intervals for
  // the answers; a store that does not respond in that time is given up on.
  std::map<int, Answer> answers;
  if (options_.store && store_usable_) {
    auto store = options_.store;
    const int world = options_.world_size, rank = options_.rank;
    const std::string mine = encode(state.issued, state.running, state.issued_op, state.running_op);
    const auto wait = 2 * poll_interval() + std::chrono::seconds(1);
    auto collected = std::make_shared<std::map<int, Answer>>();
    auto done = std::make_shared<std::promise<void>>();
    auto future = done->get_future();
    std::thread([store, world, rank, mine, wait, collected, done] {
      try {
        store->set(answer_key(rank), mine);
        store->set(kAsk, "1");
        const auto deadline = std::chrono::steady_clock::now() + wait;
        std::map<int, Answer> got;
        for (;;) {
          for (int r = 0; r < world; ++r) {
            if (got.count(r) || !store->check({answer_key(r)})) continue;
            Answer a;
            if (decode(store->get(answer_key(r)), a)) got[r] = a;
          }
          if (static_cast<int>(got.size()) == world || std::chrono::steady_clock::now() >= deadline) break;
          std::this_thread::sleep_for(std::chrono::milliseconds(50));
        }
        *collected = std::move(got);
      } catch (const std::exception&) {
      }
      done->set_value();
    }).detach();
    if (future.wait_for(wait + std::chrono::seconds(5)) == std::future_status::ready) answers = *collected;
  }

  if (answers.empty()) {
    out << "; where the other ranks are is unknown (no rendezvous store, or it did not answer)";
  } else {
    std::vector<int> inside, missing, silent;
    std::vector<std::string> details;
    for (int r = 0; r < options_.world_size; ++r) {
      auto it = answers.find(r);
      if (it == answers.end()) {
        silent.push_back(r);
        continue;
      }
      const Answer& a = it->second;
      if (a.running == seq && a.running_op == op) {
        inside.push_back(r);
      } else if (a.issued < seq) {
        missing.push_back(r);
        std::string where = "rank " + std::to_string(r) + " ";
        if (a.running != 0) {
          where += "is in " + a.running_op + " #" + std::to_string(a.running);
        } else if (a.issued > 0) {
          where += "is in none; its last was " + a.issued_op + " #" + std::to_string(a.issued);
        } else {
          where += "has issued none";
        }
        details.push_back(where);
      } else if (a.running == seq) {
        details.push_back("rank " + std::to_string(r) + " is in " + a.running_op + " #" +
                          std::to_string(seq) +
                          " instead (the ranks issue their collectives in different orders)");
      } else {
        details.push_back("rank " + std::to_string(r) + " is past it (issued #" + std::to_string(a.issued) + ")");
      }
    }
    if (!missing.empty()) out << "; rank(s) " << join(missing) << " had not entered it";
    if (!silent.empty()) out << "; rank(s) " << join(silent) << " did not answer (dead or stopped)";
    if (!inside.empty()) out << "; waiting in it: rank(s) " << join(inside);
    for (const auto& d : details) out << "; " << d;
  }
  out << ". Ending the job. FabricOptions::collective_timeout sets the limit (0 waits forever).";
  return out.str();
}

}  // namespace fabric::strategies
