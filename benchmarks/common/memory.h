// How much memory something takes while it runs, read from /proc/self/status:
// the checkpoint benchmarks' measure of a load's peak beyond what already exists.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <fstream>
#include <functional>
#include <string>
#include <thread>
#include <utility>

namespace benchmarks {

// RssAnon and VmRSS of /proc/self/status in KiB (0 when absent), from one read.
inline std::pair<long, long> anon_and_rss_kib() {
  std::ifstream in("/proc/self/status");
  long anon = 0, rss = 0;
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("RssAnon:", 0) == 0) anon = std::stol(line.substr(8));
    if (line.rfind("VmRSS:", 0) == 0) rss = std::stol(line.substr(6));
  }
  return {anon, rss};
}

// Peak growth (bytes) of anonymous and of all resident memory while `run` runs,
// sampled every 200 microseconds.
inline std::pair<double, double> peak_growth(const std::function<void()>& run) {
  const auto [anon0, rss0] = anon_and_rss_kib();
  std::atomic<bool> done{false};
  long anon = anon0, rss = rss0;
  const auto sample = [&] {
    const auto [a, r] = anon_and_rss_kib();
    anon = std::max(anon, a);
    rss = std::max(rss, r);
  };
  std::thread sampler([&] {
    while (!done) {
      sample();
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  });
  run();
  done = true;
  sampler.join();
  sample();
  return {1024.0 * static_cast<double>(anon - anon0), 1024.0 * static_cast<double>(rss - rss0)};
}

}  // namespace benchmarks
