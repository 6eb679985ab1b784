// CSVLogger: Lightning's CSVLogger layout, root_dir/name/version_N/
//   metrics.csv   one row per log call: the sorted metric names and "step" as
//                 columns (empty where a row has no value), rewritten with the
//                 wider header when a new name appears; values as Python writes them
//   hparams.yaml  the hyper-parameters, rewritten at each log_hyperparams
// so pandas.read_csv / yaml.safe_load (and Lightning's own readers) take them as
// they take Lightning's. Every call reaches the file before it returns.
#pragma once

#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "loggers/versioned_logger.h"

namespace fabric {

class CSVLogger : public VersionedLogger {
 public:
  // version < 0: one more than the largest version_N in root_dir/name, chosen
  // when first written. An empty name puts version_N directly in root_dir.
  explicit CSVLogger(std::string root_dir, std::string name = "lightning_logs",
                     int64_t version = -1);

  // A metric named "step" is an error (it is the step column).
  void log_metrics(const std::map<std::string, double>& metrics, int64_t step) override;
  void log_hyperparams(const HyperParameters& params) override;
  std::string name() const override { return "CSVLogger"; }

  std::string metrics_path() { return log_dir() + "/metrics.csv"; }

 private:
  void write_all();
  void append(const std::map<std::string, std::string>& row);

  std::set<std::string> keys_;  // sorted, as Lightning sorts its header
  // Every row so far: a new metric name means a new header and every row again.
  std::vector<std::map<std::string, std::string>> rows_;
  HyperParameters hparams_;
  bool needs_rewrite_ = true;  // the header changed (or the file is not written yet)
};

}  // namespace fabric
