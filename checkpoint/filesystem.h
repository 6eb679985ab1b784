// Small POSIX file helpers. Why not std::filesystem: pip's libtorch.so exports its
// own copies of std::filesystem functions (built against an older libstdc++); a
// program linked with it resolves some of them there and crashes (seen with
// std::filesystem::remove_all on GCC 12). Code linked with LibTorch uses these.
#pragma once

#include <string>
#include <vector>

namespace fabric::fs {

// Creates `path` and its missing parents; throws std::runtime_error naming the path.
void make_directories(const std::string& path);
bool exists(const std::string& path);
bool is_directory(const std::string& path);
// The names in directory `path` (not "." or ".."), unsorted; empty when it is
// missing or not a directory.
std::vector<std::string> list_directory(const std::string& path);
// Removes `path` recursively if it exists; throws std::runtime_error on failure.
void remove_all(const std::string& path);
// `directory` + "/" + `name`.
std::string join(const std::string& directory, const std::string& name);

}  // namespace fabric::fs
