#include "loggers/csv_logger.h"

#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <stdexcept>

#include "checkpoint/checkpoint.h"

namespace fabric {
namespace {

// Python's csv module, QUOTE_MINIMAL.
std::string csv_field(const std::string& text) {
  if (text.find_first_of(",\"\r\n") == std::string::npos) return text;
  std::string out = "\"";
  for (char c : text) out += c == '"' ? std::string("\"\"") : std::string(1, c);
  return out + "\"";
}

// A YAML scalar that yaml.safe_load reads back as the same value and type.
std::string yaml_scalar(const HyperParameter& value) {
  if (auto b = std::get_if<bool>(&value)) return *b ? "true" : "false";
  if (auto i = std::get_if<int64_t>(&value)) return std::to_string(*i);
  if (auto d = std::get_if<double>(&value)) {
    if (std::isnan(*d)) return ".nan";
    if (std::isinf(*d)) return *d > 0 ? ".inf" : "-.inf";
    std::string text = logging::python_float(*d);
    // YAML 1.1 (PyYAML) reads 1e-05 as a string: its floats need a point.
    const auto e = text.find('e');
    if (e != std::string::npos && text.find('.') == std::string::npos) text.insert(e, ".0");
    return text;
  }
  std::string out = "'";
  for (char c : std::get<std::string>(value)) out += c == '\'' ? std::string("''") : std::string(1, c);
  return out + "'";
}

std::string yaml_key(const std::string& key) {
  std::string lower;
  for (char c : key) lower += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  // Words YAML 1.1 reads as booleans or null, in any case, stay quoted.
  const bool plain = !key.empty() && (std::isalpha(static_cast<unsigned char>(key[0])) || key[0] == '_') &&
                     key.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                           "0123456789_-./") == std::string::npos &&
                     lower != "true" && lower != "false" && lower != "yes" && lower != "no" &&
                     lower != "on" && lower != "off" && lower != "null" && lower != "y" && lower != "n";
  return plain ? key : yaml_scalar(HyperParameter(key));
}

// One metrics.csv line: the row's value under each header key, empty if none.
std::string csv_row(const std::set<std::string>& keys, const std::map<std::string, std::string>& row) {
  std::string text;
  bool first = true;
  for (const auto& key : keys) {
    if (!first) text += ',';
    first = false;
    const auto it = row.find(key);
    if (it != row.end()) text += csv_field(it->second);
  }
  return text + "\r\n";
}

}  // namespace

CSVLogger::CSVLogger(std::string root_dir, std::string name, int64_t version)
    : VersionedLogger("CSVLogger", std::move(root_dir), std::move(name), version) {}

void CSVLogger::log_metrics(const std::map<std::string, double>& metrics, int64_t step) {
  if (metrics.count("step")) {
    throw std::invalid_argument(
        "CSVLogger: a metric cannot be named 'step' (it is metrics.csv's step column); rename it");
  }
  std::map<std::string, std::string> row;
  for (const auto& [key, value] : metrics) row[key] = logging::python_float(value);
  row["step"] = std::to_string(step);
  for (const auto& [key, value] : row) needs_rewrite_ = keys_.insert(key).second || needs_rewrite_;
  rows_.push_back(std::move(row));
  if (needs_rewrite_) {
    write_all();  // cleared only once the whole file is written
    needs_rewrite_ = false;
  } else {
    append(rows_.back());
  }
}

void CSVLogger::write_all() {
  std::map<std::string, std::string> header;
  for (const auto& key : keys_) header[key] = key;
  std::string text = csv_row(keys_, header);
  for (const auto& row : rows_) text += csv_row(keys_, row);
  // Through a temporary file and a rename: a run killed mid-write keeps the previous file.
  atomic_write(metrics_path(), [&](const auto& sink) { sink(text.data(), text.size()); });
}

void CSVLogger::append(const std::map<std::string, std::string>& row) {
  const std::string text = csv_row(keys_, row);
  const std::string path = metrics_path();
  FILE* f = std::fopen(path.c_str(), "ab");
  if (!f) throw std::runtime_error("CSVLogger: cannot open " + path + ": " + std::strerror(errno));
  const bool ok = std::fwrite(text.data(), 1, text.size(), f) == text.size() && std::fflush(f) == 0;
  const int error = errno;
  if (std::fclose(f) != 0 || !ok) {
    throw std::runtime_error("CSVLogger: writing " + path + " failed: " + std::strerror(ok ? errno : error));
  }
}

void CSVLogger::log_hyperparams(const HyperParameters& params) {
  for (const auto& [key, value] : params) hparams_[key] = value;
  std::string text;
  for (const auto& [key, value] : hparams_) text += yaml_key(key) + ": " + yaml_scalar(value) + "\n";
  atomic_write(log_dir() + "/hparams.yaml", [&](const auto& sink) { sink(text.data(), text.size()); });
}

}  // namespace fabric
