#!/usr/bin/env bash
# The whole test suite (`make test` runs it after set-up): builds everything with
# Bazel and runs its tests, then builds everything with CMake and runs the same
# test programs from that build, so neither build rots. Last line:
# `N passed, N failed` over every GoogleTest case of both runs.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHON
BAZEL=${BAZEL:-bazel}
failures=()
results=build/test-results
rm -rf "$results" && mkdir -p "$results/bazel" "$results/cmake"

echo "== bazel build + test"
# Build first, so the timing-sensitive example tests do not share the 2 cores
# with compilation.
$BAZEL build //... && $BAZEL test //... --test_output=errors
status=$?
if [ $status -ne 0 ] && [ $status -ne 3 ]; then
  failures+=(--failure "bazel build/test (exit status $status)")
fi
for target in fabric_tests example_tests ddp_tests host_tests; do
  if [ -f "bazel-testlogs/tests/$target/test.xml" ]; then
    cp "bazel-testlogs/tests/$target/test.xml" "$results/bazel/$target.xml"
  else
    failures+=(--failure "bazel //tests:$target produced no results")
  fi
done

echo "== cmake build + test"
prefix=$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)' 2>/dev/null)
if cmake -S . -B build/cmake -DCMAKE_PREFIX_PATH="$prefix" -DPython3_EXECUTABLE="$(command -v "$PYTHON")" > build/cmake-configure.log 2>&1 \
   && cmake --build build/cmake -j2; then
  ./build/cmake/fabric_tests --gtest_output="xml:$results/cmake/fabric_tests.xml" > build/cmake-fabric_tests.log 2>&1 \
    || grep -E "FAILED|Failure" -A3 build/cmake-fabric_tests.log | head -40
  [ -f "$results/cmake/fabric_tests.xml" ] || failures+=(--failure "cmake fabric_tests crashed (build/cmake-fabric_tests.log)")
  # The examples write their logs (--logger csv) and checkpoints into the current
  # directory: run them in build/cmake, not in the source tree.
  (cd build/cmake && ./example_tests ./autoencoder ./classifier ./gpt ./custom_trainer \
    --gtest_output="xml:$PWD/../../$results/cmake/example_tests.xml" > ../cmake-example_tests.log 2>&1) \
    || grep -E "FAILED|Failure" -A3 build/cmake-example_tests.log | head -40
  [ -f "$results/cmake/example_tests.xml" ] || failures+=(--failure "cmake example_tests crashed (build/cmake-example_tests.log)")
  ./build/cmake/ddp_tests build/cmake/ddp_worker build/cmake/fabric-run build/cmake/fsdp_worker \
    build/cmake/consolidate_checkpoint \
    --gtest_output="xml:$results/cmake/ddp_tests.xml" > build/cmake-ddp_tests.log 2>&1 \
    || grep -E "FAILED|Failure" -A3 build/cmake-ddp_tests.log | head -40
  [ -f "$results/cmake/ddp_tests.xml" ] || failures+=(--failure "cmake ddp_tests crashed (build/cmake-ddp_tests.log)")
  # Two simulated hosts (network namespaces; every case skips without root).
  ./build/cmake/host_tests scripts/two_hosts.sh build/cmake/ddp_worker build/cmake/fsdp_worker \
    --gtest_output="xml:$results/cmake/host_tests.xml" > build/cmake-host_tests.log 2>&1 \
    || grep -E "FAILED|Failure" -A3 build/cmake-host_tests.log | head -40
  [ -f "$results/cmake/host_tests.xml" ] || failures+=(--failure "cmake host_tests crashed (build/cmake-host_tests.log)")
  # The installed package, used by a project outside the tree (tests/downstream).
  rm -rf build/install build/downstream build/downstream-newer
  if cmake --install build/cmake --prefix build/install > build/cmake-install.log 2>&1; then
    ./build/cmake/install_tests "$PWD/build/install" "$PWD/tests/downstream/cmake" "$PWD/build/downstream" \
      --gtest_output="xml:$results/cmake/install_tests.xml" > build/cmake-install_tests.log 2>&1 \
      || grep -E "FAILED|Failure" -A3 build/cmake-install_tests.log | head -40
    [ -f "$results/cmake/install_tests.xml" ] || failures+=(--failure "cmake install_tests crashed (build/cmake-install_tests.log)")
  else
    tail -20 build/cmake-install.log
    failures+=(--failure "cmake --install (see build/cmake-install.log)")
  fi
else
  tail -20 build/cmake-configure.log
  failures+=(--failure "cmake configure/build (see build/cmake-configure.log)")
fi

echo "== summary"
"$PYTHON" scripts/summarize_tests.py "${failures[@]}" "$results"
