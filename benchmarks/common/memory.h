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

// A field of /proc/self/status in KiB ("RssAnon", "VmRSS"); 0 when absent.
inline long status_kib(const char* field) {
  std::ifstream in("/proc/self/status");
  const std::string prefix = std::string(field) + ":";
  for (std::string line; std::getline(in, line);) {
    if (line.rfind(prefix, 0) == 0) return std::stol(line.substr(prefix.size()));
  }
  return 0;
}

// Peak growth (bytes) of anonymous and of all resident memory while `run` runs,
// sampled every 200 microseconds.
inline std::pair<double, double> peak_growth(const std::function<void()>& run) {
  const long anon0 = status_kib("RssAnon"), rss0 = status_kib("VmRSS");
  std::atomic<bool> done{false};
  long anon = anon0, rss = rss0;
  std::thread sampler([&] {
    while (!done) {
      anon = std::max(anon, status_kib("RssAnon"));
      rss = std::max(rss, status_kib("VmRSS"));
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  });
  run();
  done = true;
  sampler.join();
  anon = std::max(anon, status_kib("RssAnon"));
  rss = std::max(rss, status_kib("VmRSS"));
  return {1024.0 * static_cast<double>(anon - anon0), 1024.0 * static_cast<double>(rss - rss0)};
}

}  // namespace benchmarks
