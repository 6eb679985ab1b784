// Loggers receive metrics from Fabric::log / log_dict, on global rank zero only.
// CSVLogger writes them in long form ("step,name,value"), one row per metric,
// flushed at every call so a crashed run keeps what it logged.
#pragma once

#include <cstdint>
#include <fstream>
#include <map>
#include <string>

namespace fabric {

class Logger {
 public:
  virtual ~Logger() = default;
  virtual void log_metrics(const std::map<std::string, double>& metrics, int64_t step) = 0;
  virtual void finalize() {}
};

class CSVLogger : public Logger {
 public:
  // Creates `directory` if needed and writes `directory`/metrics.csv.
  explicit CSVLogger(const std::string& directory);
  void log_metrics(const std::map<std::string, double>& metrics, int64_t step) override;
  void finalize() override;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::ofstream out_;
};

}  // namespace fabric
