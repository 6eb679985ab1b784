#include "loggers/progress_bar.h"

#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <stdexcept>

namespace fabric {
namespace {

std::string clock_text(double seconds) {
  const int64_t s = static_cast<int64_t>(std::llround(seconds));
  char text[32];
  if (s >= 3600) {
    std::snprintf(text, sizeof(text), "%lld:%02lld:%02lld", static_cast<long long>(s / 3600),
                  static_cast<long long>(s / 60 % 60), static_cast<long long>(s % 60));
  } else {
    std::snprintf(text, sizeof(text), "%02lld:%02lld", static_cast<long long>(s / 60),
                  static_cast<long long>(s % 60));
  }
  return text;
}

}  // namespace

ProgressMode parse_progress_mode(const std::string& text) {
  if (text == "auto") return ProgressMode::kAuto;
  if (text == "on") return ProgressMode::kOn;
  if (text == "off") return ProgressMode::kOff;
  throw std::invalid_argument("progress must be auto, on or off, got '" + text + "'");
}

ProgressBar::ProgressBar(ProgressBarOptions options, bool is_global_zero) : options_(options) {
  enabled_ = is_global_zero && (options_.mode == ProgressMode::kOn ||
                                (options_.mode == ProgressMode::kAuto && isatty(STDERR_FILENO)));
}

ProgressBar::~ProgressBar() { close(); }

void ProgressBar::update(int64_t done, const std::map<std::string, double>& metrics,
                         const std::string& prefix) {
  if (!enabled_) return;
  const auto now = std::chrono::steady_clock::now();
  if (!started_) {
    started_ = true;
    start_ = now;
    start_done_ = done;
  } else if (done != options_.total &&
             std::chrono::duration<double>(now - last_draw_).count() < options_.refresh_seconds) {
    return;
  }
  last_draw_ = now;
  const double elapsed = std::chrono::duration<double>(now - start_).count();
  const double rate = elapsed > 0 ? static_cast<double>(done - start_done_) / elapsed : 0.0;
  std::string line = prefix.empty() ? "" : prefix + "  ";
  char text[96];
  if (options_.total > 0) {
    const double fraction = std::min(1.0, static_cast<double>(done) / options_.total);
    const int filled = static_cast<int>(fraction * options_.width);
    std::snprintf(text, sizeof(text), "%lld/%lld ", static_cast<long long>(done),
                  static_cast<long long>(options_.total));
    line += text;
    line += "[" + std::string(filled, '#') + std::string(options_.width - filled, '.') + "]";
    std::snprintf(text, sizeof(text), " %3d%%", static_cast<int>(fraction * 100));
    line += text;
  } else {
    std::snprintf(text, sizeof(text), "%lld", static_cast<long long>(done));
    line += text;
  }
  std::snprintf(text, sizeof(text), "  %.1f steps/s", rate);
  line += text;
  if (options_.total > 0) {
    line += "  ETA " + (rate > 0 ? clock_text(static_cast<double>(options_.total - done) / rate)
                                 : std::string("--:--"));
  }
  for (const auto& [name, value] : metrics) {
    std::snprintf(text, sizeof(text), "  %s=%.4g", name.c_str(), value);
    line += text;
  }
  // Carriage return, the line, then erase whatever a longer previous line left.
  std::fprintf(stderr, "\r%s\033[K", line.c_str());
  std::fflush(stderr);
  drawn_ = true;
}

void ProgressBar::close() {
  if (drawn_) {
    std::fputc('\n', stderr);
    std::fflush(stderr);
  }
  drawn_ = false;
  started_ = false;
}

}  // namespace fabric
