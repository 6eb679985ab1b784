#!/usr/bin/env bash
# `make gpu-check`: everything a machine with an NVIDIA GPU can tell us, in one
# command, on a bare copy of the working tree (no Bazel, no network needed):
# the CMake build, the three test programs (fabric_tests, example_tests,
# ddp_tests; the install tests are left to `make test`) with the CUDA tests
# required to run (a skipped test is a failure here), then the benchmarks that
# use the GPU. Last line of the tests:
# `N passed, N failed`; then the benchmark ratios. Without a GPU it says so and
# exits 0.
# Needs, besides CMake, nvcc and python3 with torch 2.11: GoogleTest, Boost
# Program_options, Open MPI and zlib development files (Debian packages; on a
# machine without them, unpack their .deb files and pass the root in DEPS_ROOT,
# e.g. DEPS_ROOT=/tmp/deps after `dpkg -x pkg.deb /tmp/deps` for each).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHON

gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0)
if [ "${gpus:-0}" -lt 1 ]; then
  echo "gpu-check: no CUDA GPU on this machine (torch.cuda.is_available() is False in $PYTHON); nothing to check"
  exit 0
fi
echo "gpu-check: $gpus GPU(s): $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"

extra=()
if [ -n "${DEPS_ROOT:-}" ]; then
  extra+=("-DCMAKE_PREFIX_PATH=$($PYTHON -c 'import torch; print(torch.utils.cmake_prefix_path)');$DEPS_ROOT/usr")
  export CPATH="$DEPS_ROOT/usr/include:$DEPS_ROOT/usr/lib/x86_64-linux-gnu/openmpi/include:${CPATH:-}"
  export LIBRARY_PATH="$DEPS_ROOT/usr/lib/x86_64-linux-gnu:${LIBRARY_PATH:-}"
  export LD_LIBRARY_PATH="$DEPS_ROOT/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
  export PATH="$DEPS_ROOT/usr/bin:$PATH"
else
  extra+=("-DCMAKE_PREFIX_PATH=$($PYTHON -c 'import torch; print(torch.utils.cmake_prefix_path)')")
fi
build=build/gpu
results=build/gpu-results
rm -rf "$results" && mkdir -p "$results"
failures=()
if cmake -S . -B "$build" "${extra[@]}" -DPython3_EXECUTABLE="$(command -v "$PYTHON")" \
     -DTORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" > build/gpu-configure.log 2>&1 \
   && cmake --build "$build" -j"$(nproc)" > build/gpu-build.log 2>&1; then
  "$build/fabric_tests" --gtest_output="xml:$results/fabric_tests.xml" > build/gpu-fabric_tests.log 2>&1
  (cd "$build" && ./example_tests ./autoencoder ./classifier ./gpt ./custom_trainer \
     --gtest_output="xml:$PWD/../../$results/example_tests.xml" > ../gpu-example_tests.log 2>&1)
  "$build/ddp_tests" "$build/ddp_worker" "$build/fabric-run" "$build/fsdp_worker" \
    "$build/consolidate_checkpoint" --gtest_output="xml:$results/ddp_tests.xml" > build/gpu-ddp_tests.log 2>&1
  # A program that crashed wrote no results: that is a failure, not silence.
  for t in fabric_tests example_tests ddp_tests; do
    [ -f "$results/$t.xml" ] || failures+=(--failure "$t crashed (build/gpu-$t.log)")
  done
else
  tail -30 build/gpu-configure.log build/gpu-build.log
  failures+=(--failure "cmake configure/build (build/gpu-configure.log, build/gpu-build.log)")
fi
echo "== tests (a skipped test counts as failed here)"
"$PYTHON" scripts/summarize_tests.py --skipped-fail "${failures[@]}" "$results"
status=$?
if [ ${#failures[@]} -eq 0 ]; then
  echo "== GPU benchmarks"
  "$build/fused_bench" --device cuda --steps 50 2>&1 | tail -5
  (cd "$build" && ./autoencoder --accelerator cuda --precision bf16-mixed --max-steps 500 \
     --logger none --checkpoint '' 2>&1 | tail -2)
  "$build/gpt" --accelerator cuda --precision bf16-mixed --max-steps 200 --logger none \
    --checkpoint '' 2>&1 | tail -3
fi
exit $status
