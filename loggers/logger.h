// Loggers receive metrics from Fabric::log / log_dict and hyper-parameters from
// Fabric::log_hyperparams, on global rank zero only. The concrete loggers write
// Lightning's layout, root_dir/name/version_N/, so its tools read them:
//   CSVLogger          (csv_logger.h)          metrics.csv + hparams.yaml
//   TensorBoardLogger  (tensorboard_logger.h)  events.out.tfevents.*
// Both write through at every call, so a killed run keeps what it logged, and
// create their directory only when first written (only rank zero writes).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <variant>

namespace fabric {

// A hyper-parameter value: what Lightning's loggers accept (bool, int, float, str).
using HyperParameter = std::variant<bool, int64_t, double, std::string>;
using HyperParameters = std::map<std::string, HyperParameter>;

class Logger {
 public:
  virtual ~Logger() = default;
  virtual void log_metrics(const std::map<std::string, double>& metrics, int64_t step) = 0;
  // Loggers without a place for hyper-parameters keep this default, which throws
  // (naming the logger) rather than drop them.
  virtual void log_hyperparams(const HyperParameters& params);
  virtual void finalize() {}
  // For error messages.
  virtual std::string name() const { return "Logger"; }
};

namespace logging {

// Lightning's experiment directory: root_dir/name/version_N, N the given version
// or, when negative, one more than the largest version_N already there (0 if none).
std::string version_directory(const std::string& root_dir, const std::string& name,
                              int64_t version, int64_t* resolved_version = nullptr);

// A double as Python's repr() writes it (shortest round trip: 0.1, 1e-05, 3.0,
// inf, nan), so files match what Lightning writes for the same values.
std::string python_float(double value);

}  // namespace logging
}  // namespace fabric
