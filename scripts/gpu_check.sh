#!/usr/bin/env bash
# `make gpu-check [GPU_BUNDLE=DIR] [GPU_OUT=DIR]`: everything a machine with an
# NVIDIA GPU can tell us, in one command with no questions, on a bare copy of the
# working tree (no Bazel, no network, no .git needed):
#   gpu_check.sh [--bundle DIR] [--out DIR] [--cpu]
# the CMake build (-j$(nproc), Ninja when there), the test programs holding every
# CUDA test (fabric_tests, ddp_tests, run side by side) with the CUDA tests
# required to run (a skipped test is a failure here), last line of the tests
# `N passed, N failed`; then the GPU benchmark lines (benchmarks/gpu).
#   --bundle DIR  take GoogleTest, Boost.Program_options, Open MPI and zlib from
#                 DIR (made by `make gpu-bundle` on a Debian machine of ours) and
#                 nothing from the system but the image (CUDA, CMake, python3+torch)
#   --out DIR     logs and result files go there (default build/gpu-results), to
#                 be fetched back
#   --cpu         no GPU needed: the same build, then the CPU test programs
#                 (plus example_tests, host_tests and the install test; their
#                 slowest few cases left to make test's Bazel leg), skipped CUDA
#                 tests allowed, and the benchmarks' CPU smoke run. `make test` runs this with the system's copies of
#                 the bundle's packages hidden (scripts/without_system_deps.sh).
# Without a GPU and without --cpu it says so and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHON
bundle="" out=build/gpu-results cpu=0
while (($#)); do
  case "$1" in
    --bundle) bundle=${2:?--bundle needs a folder}; shift 2 ;;
    --out) out=${2:?--out needs a folder}; shift 2 ;;
    --cpu) cpu=1; shift ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (valid: --bundle DIR, --out DIR, --cpu)" >&2; exit 2 ;;
  esac
done
mkdir -p "$out" && out=$(cd "$out" && pwd)
rm -f "$out"/*.xml "$out"/*.log "$out/failures.txt"

if ((!cpu)); then
  gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0)
  if [ "${gpus:-0}" -lt 1 ]; then
    echo "gpu-check: no CUDA GPU on this machine (torch.cuda.is_available() is False in $PYTHON); nothing to check (--cpu runs the CPU part)"
    exit 0
  fi
  echo "gpu-check: $gpus GPU(s): $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
fi

torch_prefix=$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)' 2>/dev/null)
[ -n "$torch_prefix" ] || { echo "gpu-check: $PYTHON has no torch" >&2; exit 1; }
prefix_path=$torch_prefix
if [ -n "$bundle" ]; then
  [ -f "$bundle/MANIFEST" ] || { echo "gpu-check: $bundle is not a GPU bundle (no MANIFEST; make gpu-bundle makes one)" >&2; exit 1; }
  bundle=$(cd "$bundle" && pwd)
  usr=$bundle/usr
  arch_lib=$(ls -d "$usr"/lib/*-linux-gnu | head -1)
  prefix_path="$torch_prefix;$usr"
  export CPATH="$usr/include:$arch_lib/openmpi/include${CPATH:+:$CPATH}"
  export LIBRARY_PATH="$arch_lib:$arch_lib/openmpi/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
  export LD_LIBRARY_PATH="$arch_lib:$arch_lib/openmpi/lib:$arch_lib/pmix2/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export PATH="$usr/bin:$PATH"
  # Open MPI finds its plugins and help files under OPAL_PREFIX; PMIx (Debian's,
  # apart under pmix2/) needs its plugin path and data folder named.
  export OPAL_PREFIX=$usr PMIX_MCA_mca_base_component_path=$arch_lib/pmix2/lib/pmix \
         PMIX_DATADIR=$arch_lib/pmix2/share
  export FORTUNES_DIR=$usr/share/games/fortunes
  echo "gpu-check: dependencies from $bundle ($(grep -vc '^#' "$bundle/MANIFEST") manifest lines)"
fi

build=build/gpu
generator=()
command -v ninja > /dev/null && generator=(-G Ninja)
[ -f "$build/CMakeCache.txt" ] && ! grep -q "CMAKE_GENERATOR:INTERNAL=${generator[1]:-Unix Makefiles}\$" "$build/CMakeCache.txt" && rm -rf "$build"
failures=()
start=$SECONDS
# Warnings are errors in the CPU part (make test, CI: the compiler is Debian's,
# whose warnings the tree is kept clean of); on a GPU machine, whose compiler may
# know other warnings, only with TORCHFABRIC_WERROR=1, so that a new warning does
# not cost the scarce GPU time. TORCHFABRIC_WERROR=0 turns them off anywhere.
werror=OFF
((cpu)) && werror=ON
[ "${TORCHFABRIC_WERROR:-}" = 1 ] && werror=ON
[ "${TORCHFABRIC_WERROR:-}" = 0 ] && werror=OFF
if cmake -S . -B "$build" "${generator[@]}" -DCMAKE_PREFIX_PATH="$prefix_path" -DTORCHFABRIC_WERROR=$werror \
     -DPython3_EXECUTABLE="$(command -v "$PYTHON")" \
     -DTORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" > "$out/configure.log" 2>&1 \
   && cmake --build "$build" -j"$(nproc)" > "$out/build.log" 2>&1; then
  echo "gpu-check: built in $((SECONDS - start)) s"
  fabric_tests=("$build/fabric_tests" --gtest_output="xml:$out/fabric_tests.xml")
  ddp_tests=("$build/ddp_tests" "$build/ddp_worker" "$build/fabric-run" "$build/fsdp_worker"
             "$build/consolidate_checkpoint" --gtest_output="xml:$out/ddp_tests.xml")
  programs=(fabric_tests ddp_tests)
  if ((cpu)); then  # two programs at a time on the two cores, as Bazel's leg runs them
    # make test's Bazel leg ran every case from the same sources; the slowest few
    # (over 30 s each there, 6 of 7 minutes in all) are left to it, so that this
    # leg's time goes to what differs here: the build.
    ddp_tests+=(--gtest_filter=-Ddp.CollectivesTakeTensorsOfTwoGibibytesAndMore:FsdpUnits.ShardedSaveInterruptedAtAnyStepLeavesACompleteCheckpoint)
    "${fabric_tests[@]}" > "$out/fabric_tests.log" 2>&1 &
    "${ddp_tests[@]}" > "$out/ddp_tests.log" 2>&1 &
    wait
    # The examples write their logs and checkpoints into the current directory.
    (cd "$build" && ./example_tests ./autoencoder ./classifier ./gpt ./custom_trainer ./fabric-run \
       --gtest_filter=-Examples.ClassifierReachesEightyFivePercent:Examples.AutoencoderRunsInEveryCpuPrecision \
       --gtest_output="xml:$out/example_tests.xml" > "$out/example_tests.log" 2>&1) &
    # Two simulated hosts (network namespaces; every case skips without root).
    # Not the SLURM cases (no scripts/slurm_cluster.sh given: they skip): a bare GPU
    # image has no SLURM, and under --cpu this machine's PMIx and munge libraries,
    # which slurmd loads, are hidden. The Bazel leg of make test runs them.
    "$build/host_tests" scripts/two_hosts.sh "$build/ddp_worker" "$build/fsdp_worker" \
      "$build/fabric-run" "$build/custom_trainer" \
      --gtest_output="xml:$out/host_tests.xml" > "$out/host_tests.log" 2>&1 &
    wait
    # The installed package, used by a project outside the tree (tests/downstream).
    rm -rf build/install build/downstream build/downstream-newer
    if cmake --install "$build" --prefix build/install > "$out/install.log" 2>&1; then
      # (its Bazel case belongs to the Bazel route: make test runs it outside)
      "$build/install_tests" "$PWD/build/install" "$PWD/tests/downstream/cmake" "$PWD/build/downstream" \
        --gtest_filter=-Install.ABazelWorkspaceDependsOnTorchfabric \
        --gtest_output="xml:$out/install_tests.xml" > "$out/install_tests.log" 2>&1
      programs+=(install_tests)
    else
      tail -20 "$out/install.log"
      failures+=(--failure "cmake --install ($out/install.log)")
    fi
    programs+=(example_tests host_tests)
  else  # sixteen cores: side by side
    "${fabric_tests[@]}" > "$out/fabric_tests.log" 2>&1 &
    "${ddp_tests[@]}" > "$out/ddp_tests.log" 2>&1 &
    wait
  fi
  # A program that crashed wrote no results: that is a failure, not silence.
  for t in "${programs[@]}"; do
    if [ ! -f "$out/$t.xml" ]; then
      failures+=(--failure "$t crashed ($out/$t.log)")
      grep -E "FAILED|Failure|rror" -A3 "$out/$t.log" | head -20
    fi
  done
  echo "gpu-check: tests done at $((SECONDS - start)) s"
else
  tail -30 "$out/configure.log" "$out/build.log"
  failures+=(--failure "cmake configure/build ($out/configure.log, $out/build.log)")
fi
if ((cpu)); then
  echo "== tests (CPU; CUDA tests skip)"
  "$PYTHON" scripts/summarize_tests.py "${failures[@]}" "$out"
else
  echo "== tests (a skipped test counts as failed here)"
  "$PYTHON" scripts/summarize_tests.py --skipped-fail "${failures[@]}" "$out"
fi
status=$?
if [ -x "$build/gpu_bench" ]; then
  echo "== GPU benchmarks"
  if ((cpu)); then
    # The same code on the CPU, small: the GPU minutes must not find its bugs.
    "$build/gpu_bench" --smoke --python "$PYTHON" 2>&1 | tee "$out/gpu_bench.log" | tail -12
    if [ "${PIPESTATUS[0]}" -ne 0 ]; then
      echo "gpu-check: the benchmarks' smoke run failed ($out/gpu_bench.log)"
      failures+=(--failure "the GPU benchmarks' smoke run ($out/gpu_bench.log)")
      status=1
    fi
  else
    "$build/gpu_bench" --python "$PYTHON" 2>&1 | tee "$out/gpu_bench.log" | tail -20
    "$build/fused_bench" --device cuda --steps 50 2>&1 | tee "$out/fused_bench.log" | tail -5
    # The GPT example itself, end to end, on the bundle's fortunes (or Debian's).
    "$build/gpt" --accelerator cuda --precision bf16-mixed --max-steps 200 --logger none \
      --checkpoint '' --data "${FORTUNES_DIR:-/usr/share/games/fortunes}" 2>&1 |
      tee "$out/gpt_example.log" | tail -3
  fi
fi
# What failed besides test cases, one per line, for a caller (make test) to report.
for ((i = 1; i < ${#failures[@]}; i += 2)); do echo "${failures[i]}"; done > "$out/failures.txt"
echo "gpu-check: done in $((SECONDS - start)) s"
exit $status
