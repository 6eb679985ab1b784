// TensorBoardLogger: Lightning's TensorBoardLogger layout,
// root_dir/name/version_N/events.out.tfevents.<time>.<host>.<pid>.0, readable by
// TensorBoard and tensorboard's EventAccumulator:
//   log_metrics      one scalar (simple_value) event per metric
//   log_hyperparams  the hparams plugin's experiment / session summaries, and
//                    hp_metric = -1 at step 0, as Lightning writes them
//   log_histogram    a histogram of a tensor's values (equal-width buckets)
// The file is TensorFlow's record format (length, masked CRC-32C, data, masked
// CRC-32C) around Event protobufs; the few fields are encoded here by hand, since
// LibTorch's bundled protobuf headers shadow the system's. Each call reaches the
// file before it returns.
#pragma once

#include <cstdint>
#include <cstdio>
#include <map>
#include <string>

#include "loggers/versioned_logger.h"

namespace at {
class Tensor;
}

namespace fabric {

class TensorBoardLogger : public VersionedLogger {
 public:
  // version < 0: one more than the largest version_N in root_dir/name, chosen
  // when first written. An empty name puts version_N directly in root_dir.
  explicit TensorBoardLogger(std::string root_dir, std::string name = "lightning_logs",
                             int64_t version = -1);
  ~TensorBoardLogger() override;
  TensorBoardLogger(const TensorBoardLogger&) = delete;
  TensorBoardLogger& operator=(const TensorBoardLogger&) = delete;

  void log_metrics(const std::map<std::string, double>& metrics, int64_t step) override;
  void log_hyperparams(const HyperParameters& params) override;
  // `bins` equal-width buckets from the smallest to the largest value (numpy's
  // histogram). Non-finite values or an empty tensor are an error. Not routed
  // through Fabric: call it on global rank zero only.
  void log_histogram(const std::string& tag, const at::Tensor& values, int64_t step,
                     int64_t bins = 30);
  void finalize() override;
  std::string name() const override { return "TensorBoardLogger"; }

  // The event file (opened on first use).
  const std::string& path();

 private:
  void write_event(const std::string& event);

  std::string path_;
  std::FILE* file_ = nullptr;
};

}  // namespace fabric
