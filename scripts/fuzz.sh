#!/usr/bin/env bash
# Builds and runs the libFuzzer targets of tests/fuzz/ (see its README.md):
#   scripts/fuzz.sh [SECONDS] [TARGET...]    # default 60 s each: pickle, checkpoint, dcp
# Everything goes to build/fuzz/: objects, the binaries, the seed corpora
# (tests/fuzz/make_seeds.py, rewritten each run), the growing corpora
# (corpus-<target>/, kept between runs) and what a run finds
# (findings-<target>/crash-*, leak-*, timeout-*, oom-*). Exit status 1 when a
# target found something, 0 when it ran clean for SECONDS.
#
# Environment: PYTHON (python3), CXX (clang++), JOBS (2: parallel compiles),
# SANITIZE (fuzzer,address), FUZZ_FLAGS (extra libFuzzer flags, e.g. -jobs=2),
# FUZZ_BUILD_ONLY=1 (build, write seeds, stop), FUZZ_KEEP_GOING=1 (libFuzzer's
# fork mode: record a crash, timeout or out-of-memory and go on fuzzing, so one
# known bug does not hide the next; one child process, or FORKS of them).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(pickle checkpoint dcp)
PYTHON=${PYTHON:-python3}
CXX=${CXX:-clang++}
JOBS=${JOBS:-2}
SANITIZE=${SANITIZE:-fuzzer,address}
out=build/fuzz

command -v "$CXX" >/dev/null || { echo "fuzz.sh: no $CXX (apt-get install clang)" >&2; exit 2; }
torch_dir=$("$PYTHON" -c 'import os, torch; print(os.path.dirname(torch.__file__))') || {
  echo "fuzz.sh: $PYTHON cannot import torch (make setup)" >&2; exit 2; }

# The CMake/Bazel flags for the fabric sources (C++20, LibTorch's headers and
# ABI), plus the sanitizers. -isystem keeps pip's bundled headers (fmt,
# protobuf) ahead of Debian's and LibTorch's warnings quiet.
cxxflags=(-std=c++20 -O1 -g -fno-omit-frame-pointer -D_GLIBCXX_USE_CXX11_ABI=1 -I.
          -isystem "$torch_dir/include" -isystem "$torch_dir/include/torch/csrc/api/include"
          -Wno-unused-parameter)
compile_sanitize=${SANITIZE//fuzzer/fuzzer-no-link}
ldflags=(-L"$torch_dir/lib" -Wl,-rpath,"$torch_dir/lib" -ltorch -ltorch_cpu -lc10 -pthread)

# The project sources each target needs, nothing else (no strategies, no MPI).
pickle_srcs=(checkpoint/pickle_reader.cpp checkpoint/pickle_values.cpp checkpoint/mapped_file.cpp)
dcp_srcs=(checkpoint/dcp_metadata.cpp "${pickle_srcs[@]}")
checkpoint_srcs=(checkpoint/checkpoint.cpp checkpoint/pickle_reader.cpp checkpoint/pickle_values.cpp checkpoint/mapped_file.cpp
                 checkpoint/state_dict.cpp checkpoint/rng_state.cpp checkpoint/serialization.cpp
                 checkpoint/filesystem.cpp optim/codec.cpp optim/builtin_codecs.cpp
                 tests/fuzz/sharded_stub.cpp)

mkdir -p "$out/obj"
# One object per source, rebuilt when the source or any project header is newer.
object_of() { local o=${1//\//_}; echo "$out/obj/${o%.cpp}.o"; }
stale() {
  local obj=$1 src=$2
  [ -e "$obj" ] || return 0
  [ "$src" -nt "$obj" ] && return 0
  [ -n "$(find checkpoint fabric optim strategies precision -name '*.h' -newer "$obj" -print -quit)" ]
}
# clang (unlike GCC) rejects checkpoint/checkpoint.h unless torch::nn::Module and
# torch::optim::Optimizer are complete where it is included: its inline
# StateValue(const FabricOptimizer&) resolves overloads whose std::is_base_of_v
# tests need them. checkpoint.cpp includes its header first, so they are
# included ahead of it here (the fuzz sources include them themselves).
extra_flags() {
  case $1 in
    checkpoint/checkpoint.cpp) echo "-include torch/nn/module.h -include torch/optim/optimizer.h" ;;
  esac
}
compile() {
  local src=$1 obj
  obj=$(object_of "$src")
  if stale "$obj" "$src"; then
    echo "fuzz.sh: compiling $src" >&2
    rm -f "$obj"
    nice -n 10 "$CXX" "${cxxflags[@]}" -fsanitize="$compile_sanitize" $(extra_flags "$src") -c "$src" -o "$obj.tmp"
    mv "$obj.tmp" "$obj"
  fi
}

sources=()
for t in "${targets[@]}"; do
  case $t in
    pickle) sources+=("${pickle_srcs[@]}" tests/fuzz/pickle_fuzz.cpp) ;;
    checkpoint) sources+=("${checkpoint_srcs[@]}" tests/fuzz/checkpoint_fuzz.cpp) ;;
    dcp) sources+=("${dcp_srcs[@]}" tests/fuzz/dcp_fuzz.cpp) ;;
    *) echo "fuzz.sh: unknown target $t (pickle, checkpoint, dcp)" >&2; exit 2 ;;
  esac
done
mapfile -t sources < <(printf '%s\n' "${sources[@]}" | sort -u)
for src in "${sources[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
  compile "$src" &
done
wait
for src in "${sources[@]}"; do
  [ -e "$(object_of "$src")" ] || { echo "fuzz.sh: $src did not compile" >&2; exit 2; }
done

for t in "${targets[@]}"; do
  case $t in
    pickle) srcs=("${pickle_srcs[@]}") ;;
    dcp) srcs=("${dcp_srcs[@]}") ;;
    *) srcs=("${checkpoint_srcs[@]}") ;;
  esac
  objs=()
  for s in "${srcs[@]}" "tests/fuzz/${t}_fuzz.cpp"; do objs+=("$(object_of "$s")"); done
  echo "fuzz.sh: linking $out/${t}_fuzz" >&2
  nice -n 10 "$CXX" -fsanitize="$SANITIZE" "${objs[@]}" "${ldflags[@]}" -o "$out/${t}_fuzz"
done

nice -n 10 "$PYTHON" tests/fuzz/make_seeds.py "$out" >&2
[ "${FUZZ_BUILD_ONLY:-0}" = 1 ] && exit 0

# LibTorch is not built with ASan: its one-definition and container checks would
# report its own duplicate symbols, not our bugs.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_odr_violation=0:detect_leaks=1:abort_on_error=0:allocator_may_return_null=1}
# LibTorch's own leak on a damaged zip (see the file).
export LSAN_OPTIONS=${LSAN_OPTIONS:-suppressions=$PWD/tests/fuzz/lsan.supp:print_suppressions=0}
mode_flags=()
if [ "${FUZZ_KEEP_GOING:-0}" = 1 ]; then
  mode_flags=(-fork="${FORKS:-1}" -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1)
fi
status=0
for t in "${targets[@]}"; do
  corpus=$out/corpus-$t findings=$out/findings-$t
  mkdir -p "$corpus" "$findings"
  case $t in pickle|dcp) max_len=16384 ;; checkpoint) max_len=65536 ;; esac
  echo "fuzz.sh: fuzzing $t for ${seconds}s (corpus $corpus, findings $findings)" >&2
  before=$(find "$findings" -type f | wc -l)
  # shellcheck disable=SC2086
  if ! nice -n 10 "$out/${t}_fuzz" -max_total_time="$seconds" -max_len=$max_len \
      -rss_limit_mb=4096 -timeout=10 -print_final_stats=1 -artifact_prefix="$findings/" \
      "${mode_flags[@]}" ${FUZZ_FLAGS:-} "$corpus" "$out/seeds-$t"; then
    echo "fuzz.sh: $t found something: see $findings/" >&2
    status=1
  elif [ "$(find "$findings" -type f | wc -l)" -gt "$before" ]; then
    echo "fuzz.sh: $t found something (kept going): see $findings/" >&2
    status=1
  fi
done
exit $status
