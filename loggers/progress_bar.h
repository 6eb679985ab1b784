// ProgressBar: one line on stderr, redrawn in place, for long loops:
//   epoch 2  340/1000 [#####.........]  34%  412.3 steps/s  ETA 00:01  loss=0.0312
// Drawn on global rank zero only, and with mode "auto" only when stderr is a
// terminal: under mpirun or in CI logs (stderr a pipe or file) it draws nothing,
// so the loop's own per-epoch lines stay the log. "on" draws anyway, "off" never.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <string>

namespace fabric {

enum class ProgressMode { kAuto, kOn, kOff };

// "auto", "on" or "off"; anything else is an error naming the choices.
ProgressMode parse_progress_mode(const std::string& text);

struct ProgressBarOptions {
  ProgressMode mode = ProgressMode::kAuto;
  int64_t total = -1;        // steps in the run; < 0: unknown (no bar, no ETA)
  double refresh_seconds = 0.1;  // at most this often, besides the last step
  int width = 24;            // characters of the bar itself
};

class ProgressBar {
 public:
  ProgressBar(ProgressBarOptions options, bool is_global_zero);
  ~ProgressBar();  // ends the line if one was drawn
  ProgressBar(const ProgressBar&) = delete;
  ProgressBar& operator=(const ProgressBar&) = delete;

  // `done` steps of `total` are finished; metrics (e.g. the latest loss) are shown
  // after the ETA. `prefix` (e.g. "epoch 2") leads the line.
  void update(int64_t done, const std::map<std::string, double>& metrics = {},
              const std::string& prefix = "");
  // Ends the current line (the next update starts a new one).
  void close();
  bool enabled() const { return enabled_; }

 private:
  ProgressBarOptions options_;
  bool enabled_;
  bool drawn_ = false;
  bool started_ = false;
  int64_t start_done_ = 0;
  std::chrono::steady_clock::time_point start_, last_draw_;
};

}  // namespace fabric
