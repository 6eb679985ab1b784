#include "loggers/tensorboard_logger.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/isfinite.h>
#include <c10/util/Exception.h>
#include <unistd.h>

#include <boost/crc.hpp>

#include <algorithm>

#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "checkpoint/filesystem.h"

namespace fabric {
namespace {

// The protobuf wire format, for the handful of fields an event needs.
class Proto {
 public:
  Proto& varint_field(int field, uint64_t value) {
    key(field, 0);
    varint(value);
    return *this;
  }
  Proto& double_field(int field, double value) {
    key(field, 1);
    raw(&value, 8);
    return *this;
  }
  Proto& float_field(int field, float value) {
    key(field, 5);
    raw(&value, 4);
    return *this;
  }
  Proto& bytes_field(int field, const std::string& value) {
    key(field, 2);
    varint(value.size());
    out_ += value;
    return *this;
  }
  Proto& message_field(int field, const Proto& message) { return bytes_field(field, message.out_); }
  Proto& packed_doubles(int field, const std::vector<double>& values) {
    std::string packed(values.size() * 8, '\0');
    if (!values.empty()) std::memcpy(packed.data(), values.data(), packed.size());
    return bytes_field(field, packed);
  }
  const std::string& bytes() const { return out_; }

 private:
  void key(int field, int wire_type) { varint(static_cast<uint64_t>(field) << 3 | wire_type); }
  void varint(uint64_t value) {
    while (value >= 0x80) {
      out_ += static_cast<char>(value | 0x80);
      value >>= 7;
    }
    out_ += static_cast<char>(value);
  }
  void raw(const void* data, size_t size) {  // little-endian, as the machines are
    out_.append(static_cast<const char*>(data), size);
  }
  std::string out_;
};

uint32_t masked_crc32c(const void* data, size_t size) {
  boost::crc_optimal<32, 0x1EDC6F41, 0xFFFFFFFF, 0xFFFFFFFF, true, true> crc;
  crc.process_bytes(data, size);
  const uint32_t value = crc.checksum();
  return ((value >> 15) | (value << 17)) + 0xa282ead8u;
}

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// Event{wall_time, step, summary{value{tag, ...}}} with `value` the rest of the Value.
std::string summary_event(int64_t step, Proto value) {
  Proto summary;
  summary.message_field(1, value);
  Proto event;
  event.double_field(1, now_seconds()).varint_field(2, static_cast<uint64_t>(step));
  event.message_field(5, summary);
  return event.bytes();
}

// A Summary.Value carrying hparams plugin data (HParamsPluginData, version 0).
Proto hparams_value(const std::string& tag, int data_field, const Proto& data) {
  Proto plugin_data;
  plugin_data.varint_field(1, 0).message_field(data_field, data);
  Proto plugin;
  plugin.bytes_field(1, "hparams").bytes_field(2, plugin_data.bytes());
  Proto metadata;
  metadata.message_field(1, plugin);
  Proto value;
  value.bytes_field(1, tag).message_field(9, metadata);
  return value;
}

}  // namespace

TensorBoardLogger::TensorBoardLogger(std::string root_dir, std::string name, int64_t version)
    : VersionedLogger("TensorBoardLogger", std::move(root_dir), std::move(name), version) {}

TensorBoardLogger::~TensorBoardLogger() {
  if (file_) std::fclose(file_);
}

const std::string& TensorBoardLogger::path() {
  if (file_) return path_;
  fs::make_directories(log_dir());
  char host[256] = "localhost";
  gethostname(host, sizeof(host) - 1);
  const double wall = now_seconds();
  path_ = log_dir() + "/events.out.tfevents." + std::to_string(static_cast<int64_t>(wall)) + "." +
          host + "." + std::to_string(getpid()) + ".0";
  file_ = std::fopen(path_.c_str(), "wb");
  if (!file_) {
    throw std::runtime_error("TensorBoardLogger: cannot open " + path_ + ": " + std::strerror(errno));
  }
  Proto first;  // every event file starts with its version
  first.double_field(1, wall).bytes_field(3, "brain.Event:2");
  write_event(first.bytes());
  return path_;
}

void TensorBoardLogger::write_event(const std::string& event) {
  char header[12];
  const uint64_t length = event.size();
  std::memcpy(header, &length, 8);
  const uint32_t header_crc = masked_crc32c(header, 8);
  std::memcpy(header + 8, &header_crc, 4);
  const uint32_t data_crc = masked_crc32c(event.data(), event.size());
  const bool ok = std::fwrite(header, 1, 12, file_) == 12 &&
                  std::fwrite(event.data(), 1, event.size(), file_) == event.size() &&
                  std::fwrite(&data_crc, 1, 4, file_) == 4 && std::fflush(file_) == 0;
  if (!ok) {
    throw std::runtime_error("TensorBoardLogger: writing " + path_ + " failed: " + std::strerror(errno));
  }
}

void TensorBoardLogger::log_metrics(const std::map<std::string, double>& metrics, int64_t step) {
  path();
  for (const auto& [tag, value] : metrics) {
    Proto summary_value;
    summary_value.bytes_field(1, tag).float_field(2, static_cast<float>(value));
    write_event(summary_event(step, summary_value));
  }
}

void TensorBoardLogger::log_hyperparams(const HyperParameters& params) {
  path();
  // Lightning logs a placeholder metric so TensorBoard's HPARAMS tab shows the run.
  const std::map<std::string, double> metrics{{"hp_metric", -1.0}};
  log_metrics(metrics, 0);
  Proto experiment, start;
  for (const auto& [key, value] : params) {
    Proto proto_value;  // google.protobuf.Value
    int type;           // hparams DataType: 1 string, 2 bool, 3 float64
    if (auto b = std::get_if<bool>(&value)) {
      proto_value.varint_field(4, *b);
      type = 2;
    } else if (auto s = std::get_if<std::string>(&value)) {
      proto_value.bytes_field(3, *s);
      type = 1;
    } else {
      const double number = std::holds_alternative<int64_t>(value)
                                ? static_cast<double>(std::get<int64_t>(value))
                                : std::get<double>(value);
      proto_value.double_field(2, number);
      type = 3;
    }
    Proto entry;  // map<string, Value> entry
    entry.bytes_field(1, key).message_field(2, proto_value);
    start.message_field(1, entry);
    Proto info;
    info.bytes_field(1, key).varint_field(4, type);
    experiment.message_field(4, info);
  }
  for (const auto& [tag, unused] : metrics) {
    Proto metric_name;
    metric_name.bytes_field(2, tag);
    Proto metric_info;
    metric_info.message_field(1, metric_name);
    experiment.message_field(5, metric_info);
  }
  Proto end;
  end.varint_field(1, 1);  // STATUS_SUCCESS
  write_event(summary_event(0, hparams_value("_hparams_/experiment", 2, experiment)));
  write_event(summary_event(0, hparams_value("_hparams_/session_start_info", 3, start)));
  write_event(summary_event(0, hparams_value("_hparams_/session_end_info", 4, end)));
}

void TensorBoardLogger::log_histogram(const std::string& tag, const at::Tensor& values,
                                      int64_t step, int64_t bins) {
  if (bins < 1) throw std::invalid_argument("TensorBoardLogger: bins must be at least 1, got " + std::to_string(bins));
  const at::Tensor flat = values.detach().to(at::kCPU, at::kDouble).contiguous().reshape({-1});
  const int64_t n = flat.numel();
  if (n == 0) throw std::invalid_argument("TensorBoardLogger: histogram '" + tag + "' of an empty tensor");
  const int64_t non_finite = n - at::isfinite(flat).sum().item<int64_t>();
  if (non_finite > 0) {
    throw std::invalid_argument("TensorBoardLogger: histogram '" + tag + "' has " +
                                std::to_string(non_finite) + " non-finite value(s) (nan or inf)");
  }
  const double* data = flat.data_ptr<double>();
  double lo = data[0], hi = data[0], sum = 0, sum_squares = 0;
  for (int64_t i = 0; i < n; ++i) {
    lo = std::min(lo, data[i]);
    hi = std::max(hi, data[i]);
    sum += data[i];
    sum_squares += data[i] * data[i];
  }
  // numpy's edges (linspace: i * step + first); all-equal values widen to +-0.5.
  double first = lo, last = hi;
  if (first == last) {
    first -= 0.5;
    last += 0.5;
  }
  std::vector<double> edges(bins + 1);
  const double step_width = (last - first) / static_cast<double>(bins);
  for (int64_t i = 0; i <= bins; ++i) edges[i] = static_cast<double>(i) * step_width + first;
  edges[bins] = last;
  std::vector<double> counts(bins, 0.0);
  const double scale = bins / (last - first);
  for (int64_t i = 0; i < n; ++i) {
    int64_t index = static_cast<int64_t>((data[i] - first) * scale);
    index = std::clamp<int64_t>(index, 0, bins - 1);
    // Round-off may put a value one bucket off its edges: settle by the edges.
    if (data[i] < edges[index] && index > 0) --index;
    if (index + 1 < bins && data[i] >= edges[index + 1]) ++index;
    counts[index] += 1;
  }
  Proto histogram;
  histogram.double_field(1, lo).double_field(2, hi).double_field(3, static_cast<double>(n));
  histogram.double_field(4, sum).double_field(5, sum_squares);
  histogram.packed_doubles(6, std::vector<double>(edges.begin() + 1, edges.end()));
  histogram.packed_doubles(7, counts);
  path();
  Proto value;
  value.bytes_field(1, tag).message_field(5, histogram);
  write_event(summary_event(step, value));
}

void TensorBoardLogger::finalize() {
  if (file_ && std::fflush(file_) != 0) {
    throw std::runtime_error("TensorBoardLogger: writing " + path_ + " failed: " + std::strerror(errno));
  }
}

}  // namespace fabric
