#!/usr/bin/env bash
# The whole test suite (`make test` runs it after set-up): builds everything with
# Bazel and runs its tests, then builds everything with CMake the way a bare GPU
# machine does (scripts/gpu_check.sh --bundle --cpu) and runs the same test
# programs from that build, so neither build nor the GPU route rots. Last line:
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

if ! "$PYTHON" scripts/check_layers.py; then
  failures+=(--failure "layers: an include against the layer order (scripts/check_layers.py)")
fi
if ! "$PYTHON" scripts/check_build_parity.py; then
  failures+=(--failure "build parity: Bazel and CMake differ (scripts/check_build_parity.py)")
fi

echo "== cmake build + test (the GPU route: scripts/gpu_check.sh --bundle --cpu)"
# The CMake build is the one the GPU machines use, from the GPU bundle alone:
# gather it (Debian's package files), copy the tree without .git (as it reaches
# a GPU machine), and run the GPU check's CPU part there with this machine's own
# copies of the bundle's packages hidden, so that a file missing from the bundle
# fails here. Its test programs are the ones the Bazel leg ran, from this build.
bundle=$PWD/build/gpu-bundle
if [ ! -f "$bundle/MANIFEST" ] || [ scripts/gpu_bundle.sh -nt "$bundle/MANIFEST" ]; then
  scripts/gpu_bundle.sh "$bundle" > build/gpu-bundle.log 2>&1 || { tail -5 build/gpu-bundle.log; failures+=(--failure "make gpu-bundle (build/gpu-bundle.log)"); }
fi
tail -1 build/gpu-bundle.log 2>/dev/null
tree=build/gpu-tree
mkdir -p "$tree"
# mtimes kept (tar), so that the copy's build stays incremental between runs
tar -C . --exclude=./.git --exclude=./build --exclude='./bazel-*' -cf - . | tar -C "$tree" -xf -
# ... and what the tree no longer has goes from the copy too (Bazel globs would see it)
(cd "$tree" && find . \( -path ./build -o -path './bazel-*' \) -prune -o \( -type f -o -type l \) -print) |
  while IFS= read -r f; do [ -e "$f" ] || [ -L "$f" ] || rm -f "$tree/$f"; done
if [ -f "$bundle/MANIFEST" ]; then
  hide=(scripts/without_system_deps.sh "$bundle")
  hide_status=0
  scripts/without_system_deps.sh "$bundle" true > /dev/null 2>&1 || hide_status=$?
  if [ "$hide_status" -eq 77 ]; then
    echo "run_tests: cannot hide the system's packages here (no root or mount namespaces): the CMake leg uses them"
    hide=()
  fi
  "${hide[@]}" "$tree/scripts/gpu_check.sh" --bundle "$bundle" --cpu --out "$PWD/$results/cmake" \
    > build/gpu-check-cpu.log 2>&1
  grep -E "^gpu-check:|hidden|passed, .* failed|^gpt|/single_device|/lightning|MFU|checkpoint loaded" build/gpu-check-cpu.log
  grep -q "^gpu-check: done" build/gpu-check-cpu.log || failures+=(--failure "gpu_check.sh --cpu ended early (build/gpu-check-cpu.log)")
  # The Bazel downstream workspace (tests/install_test.cpp) builds with the system's
  # packages, so it runs here, outside the namespace, from the same build.
  (cd "$tree" && build/gpu/install_tests "$PWD/build/install" "$PWD/tests/downstream/cmake" "$PWD/build/downstream" \
     --gtest_filter=Install.ABazelWorkspaceDependsOnTorchfabric \
     --gtest_output="xml:$OLDPWD/$results/cmake/install_bazel_tests.xml" > ../install_bazel_tests.log 2>&1) \
    || grep -E "FAILED|Failure" -A3 build/install_bazel_tests.log | head -20
  [ -f "$results/cmake/install_bazel_tests.xml" ] || failures+=(--failure "install_tests' Bazel case crashed (build/install_bazel_tests.log)")
  # What it found besides test cases (a build, a crash, the smoke run), as it recorded it.
  while IFS= read -r line; do
    failures+=(--failure "gpu_check.sh --cpu: $line")
  done < <(cat "$results/cmake/failures.txt" 2>/dev/null)
fi

echo "== summary"
"$PYTHON" scripts/summarize_tests.py "${failures[@]}" "$results"
