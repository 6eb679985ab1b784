// The installed package (CMake build only: `cmake --install` into a prefix, as
// `make install PREFIX=...` does): a project outside the source tree finds it
// with find_package(TorchFabric 0.2), links TorchFabric::torchfabric, builds and
// trains; a newer version than installed is refused at configure time; and a
// Bazel workspace depends on the source tree through deps.bzl.
// Arguments: INSTALL_PREFIX DOWNSTREAM_SOURCE_DIR BUILD_DIR.
#include <cstdio>
#include <fstream>
#include <regex>
#include <string>

#include "test_util.h"

namespace {
std::string prefix, source, build;

std::string torch_prefix() {
  auto r = testutil::run_command(testutil::python() +
                                 " -c 'import torch; print(torch.utils.cmake_prefix_path)'");
  EXPECT_EQ(r.status, 0) << r.output;
  while (!r.output.empty() && (r.output.back() == '\n' || r.output.back() == '\r')) {
    r.output.pop_back();
  }
  return r.output;
}
// What tests/downstream/cmake/main.cpp prints after fitting y = 3x - 1.
void expect_fitted(const std::string& output) {
  std::smatch m;
  ASSERT_TRUE(std::regex_search(
      output, m,
      std::regex("downstream: loss ([0-9.]+) -> ([0-9.]+), weight ([-0-9.]+), "
                 "bias ([-0-9.]+), step 200, loaded equal")))
      << output;
  EXPECT_GT(std::stod(m[1]), 0.5);   // from a random start
  EXPECT_LT(std::stod(m[2]), 1e-3);  // fitted
  EXPECT_NEAR(std::stod(m[3]), 3.0, 0.05);
  EXPECT_NEAR(std::stod(m[4]), -1.0, 0.05);
}

}  // namespace

TEST(Install, ADownstreamProjectFindsBuildsAndTrains) {
  const std::string configure = "cmake -S " + source + " -B " + build +
                                " -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH='" + prefix +
                                ";" + torch_prefix() + "'";
  auto r = testutil::run_command(configure);
  ASSERT_EQ(r.status, 0) << r.output;
  std::ifstream version_file(std::string(TORCHFABRIC_SOURCE_DIR) + "/VERSION");
  std::string version;
  version_file >> version;
  EXPECT_NE(r.output.find("found TorchFabric " + version), std::string::npos) << r.output;
  r = testutil::run_command("cmake --build " + build + " -j2");
  ASSERT_EQ(r.status, 0) << r.output;
  r = testutil::run_command(build + "/downstream " + build + "/downstream.pt");
  ASSERT_EQ(r.status, 0) << r.output;
  expect_fitted(r.output);
}

TEST(Install, ANewerVersionThanInstalledIsRefused) {
  const std::string dir = build + "-newer";
  testutil::run_command("rm -rf " + dir + " && mkdir -p " + dir);
  std::ofstream(dir + "/CMakeLists.txt")
      << "cmake_minimum_required(VERSION 3.18)\nproject(newer LANGUAGES CXX)\n"
         "find_package(TorchFabric 99.0 REQUIRED)\n";
  const auto r = testutil::run_command("cmake -S " + dir + " -B " + dir + "/build" +
                                       " -DCMAKE_PREFIX_PATH='" + prefix + "'");
  EXPECT_NE(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("99.0"), std::string::npos) << r.output;
}

// A Bazel workspace outside the tree depends on torchfabric through
// local_repository + torchfabric_dependencies() (deps.bzl) and an import of its
// .bazelrc, as the README shows, and builds and runs the same program (Bazel
// 4.2.3, offline). Its build compiles torchfabric again (another output base).
TEST(Install, ABazelWorkspaceDependsOnTorchfabric) {
  const std::string repo = TORCHFABRIC_SOURCE_DIR;
  const std::string dir = build + "-bazel";
  ASSERT_EQ(testutil::run_command("rm -rf " + dir + " && mkdir -p " + dir + " && cp " + repo +
                                  "/tests/downstream/bazel/BUILD.bazel " + source + "/main.cpp " + dir)
                .status,
            0);
  std::ofstream(dir + "/WORKSPACE")
      << "workspace(name = \"downstream\")\n\n"
         "local_repository(name = \"torchfabric\", path = \"" << repo << "\")\n\n"
         "load(\"@torchfabric//:deps.bzl\", \"torchfabric_dependencies\")\n\n"
         "torchfabric_dependencies()\n";
  // (fastbuild: this checks that the workspace builds and trains, not its speed,
  // and -O0 compiles faster in make test's costliest case)
  std::ofstream(dir + "/.bazelrc") << "import " << repo << "/.bazelrc\n"
                                   << "build --compilation_mode=fastbuild\n";
  auto r = testutil::run_command("cd " + dir + " && bazel build //:downstream");
  if (r.status == 0) r = testutil::run_command(dir + "/bazel-bin/downstream " + dir + "/downstream.pt");
  testutil::run_command("cd " + dir + " && bazel shutdown");  // its server is not needed again
  ASSERT_EQ(r.status, 0) << r.output;
  expect_fitted(r.output);
}

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  if (argc != 4) {
    std::fprintf(stderr, "usage: install_tests INSTALL_PREFIX DOWNSTREAM_SOURCE_DIR BUILD_DIR\n");
    return 2;
  }
  prefix = argv[1];
  source = argv[2];
  build = argv[3];
  return RUN_ALL_TESTS();
}
