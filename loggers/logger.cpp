#include "loggers/logger.h"

#include "checkpoint/filesystem.h"
#include "loggers/versioned_logger.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <utility>

namespace fabric {

void Logger::log_hyperparams(const HyperParameters& params) {
  throw std::runtime_error(name() + " has no place for hyper-parameters (" +
                           std::to_string(params.size()) +
                           " given); CSVLogger and TensorBoardLogger record them");
}

VersionedLogger::VersionedLogger(const std::string& kind, std::string root_dir, std::string name,
                                 int64_t version)
    : root_dir_(std::move(root_dir)), name_(std::move(name)), version_(version) {
  if (root_dir_.empty()) throw std::invalid_argument(kind + ": root_dir is empty");
}

const std::string& VersionedLogger::log_dir() {
  if (log_dir_.empty()) log_dir_ = logging::version_directory(root_dir_, name_, version_, &version_);
  return log_dir_;
}

int64_t VersionedLogger::version() {
  log_dir();
  return version_;
}

namespace logging {

std::string version_directory(const std::string& root_dir, const std::string& name,
                              int64_t version, int64_t* resolved_version) {
  const std::string versions_root = name.empty() ? root_dir : fs::join(root_dir, name);
  if (version < 0) {
    version = 0;
    for (const auto& entry : fs::list_directory(versions_root)) {
      if (entry.rfind("version_", 0) != 0) continue;
      const std::string digits = entry.substr(8);
      // Not a version of ours: no digits, other characters, or too many digits.
      if (digits.empty() || digits.size() > 18 ||
          digits.find_first_not_of("0123456789") != std::string::npos ||
          !fs::is_directory(fs::join(versions_root, entry))) {
        continue;
      }
      version = std::max<int64_t>(version, std::stoll(digits) + 1);
    }
  }
  if (resolved_version) *resolved_version = version;
  return fs::join(versions_root, "version_" + std::to_string(version));
}

std::string python_float(double value) {
  if (std::isnan(value)) return "nan";
  if (std::isinf(value)) return value > 0 ? "inf" : "-inf";
  // Shortest round-trip digits and the decimal exponent, then Python's layout:
  // scientific when the exponent is below -4 or at least 16, else positional
  // with at least one digit after the point.
  char buffer[64];
  const auto end = std::to_chars(buffer, buffer + sizeof(buffer), value,
                                 std::chars_format::scientific).ptr;
  std::string text(buffer, end);
  std::string sign;
  if (text[0] == '-') {
    sign = "-";
    text.erase(0, 1);
  }
  const auto e = text.find('e');
  const int exponent = std::atoi(text.c_str() + e + 1);
  std::string digits;
  for (size_t i = 0; i < e; ++i) {
    if (text[i] != '.') digits += text[i];
  }
  std::string out;
  if (exponent < -4 || exponent >= 16) {
    out = digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    char exp_text[16];
    std::snprintf(exp_text, sizeof(exp_text), "e%c%02d", exponent < 0 ? '-' : '+', std::abs(exponent));
    out += exp_text;
  } else if (exponent >= 0) {
    const size_t whole = static_cast<size_t>(exponent) + 1;
    if (digits.size() <= whole) {
      out = digits + std::string(whole - digits.size(), '0') + ".0";
    } else {
      out = digits.substr(0, whole) + "." + digits.substr(whole);
    }
  } else {
    out = "0." + std::string(static_cast<size_t>(-exponent - 1), '0') + digits;
  }
  return sign + out;
}

}  // namespace logging
}  // namespace fabric
