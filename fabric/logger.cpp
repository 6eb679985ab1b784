#include "fabric/logger.h"

#include "fabric/filesystem.h"

#include <iomanip>
#include <stdexcept>

namespace fabric {

CSVLogger::CSVLogger(const std::string& directory) {
  fs::make_directories(directory);
  path_ = fs::join(directory, "metrics.csv");
  out_.open(path_, std::ios::out | std::ios::trunc);
  if (!out_) throw std::runtime_error("CSVLogger: cannot open " + path_ + " for writing");
  out_ << "step,name,value\n";
  out_.flush();
}

void CSVLogger::log_metrics(const std::map<std::string, double>& metrics, int64_t step) {
  for (const auto& [name, value] : metrics) {
    out_ << step << ',' << name << ',' << std::setprecision(17) << value << '\n';
  }
  out_.flush();
}

void CSVLogger::finalize() { out_.flush(); }

}  // namespace fabric
