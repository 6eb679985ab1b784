// What CSVLogger and TensorBoardLogger share: Lightning's experiment directory,
// root_dir/name/version_N, with the version chosen on first use (so only the
// rank that writes ever looks at or creates the directory).
#pragma once

#include <cstdint>
#include <string>

#include "loggers/logger.h"

namespace fabric {

class VersionedLogger : public Logger {
 public:
  // root_dir/name/version_N (resolves the version on first use).
  const std::string& log_dir();
  int64_t version();

 protected:
  // version < 0: one more than the largest version_N in root_dir/name. An empty
  // name puts version_N directly in root_dir. An empty root_dir is an error
  // naming `kind`.
  VersionedLogger(const std::string& kind, std::string root_dir, std::string name, int64_t version);

 private:
  std::string root_dir_, name_, log_dir_;
  int64_t version_;
};

}  // namespace fabric
