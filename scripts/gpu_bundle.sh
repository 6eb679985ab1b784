#!/usr/bin/env bash
# `make gpu-bundle [GPU_BUNDLE=DIR]`: gathers, on a Debian machine of ours, what the
# CMake build and the GPU check's test programs need beyond a bare GPU image
# (CUDA, CMake, ninja, python3 with torch 2.11): Debian's own package files,
# downloaded (apt-get download) and unpacked (dpkg -x), nothing compiled here.
#   Boost.Program_options  library + CMake config; of the Boost headers only
#                          those the sources include (their closure under g++ -M)
#   GoogleTest             libgtest-dev's headers, static libraries, CMake config
#   Open MPI               headers, libmpi and its plugins, mpirun/orted, help
#                          files, with what they load (PMIx, hwloc, libevent, ...)
#   zlib                   headers and library
#   fortunes               the GPT example's text (its GPU benchmark)
# Open MPI is needed on a one-GPU machine too: every torchfabric program links
# libmpi (the CPU backend), and ddp_tests' CPU cases start ranks with mpirun.
# Plugins for network fabrics (UCX, libfabric, verbs, PSM) are left out, with
# what needs them: one machine talks through shared memory.
# Fashion-MNIST (31 MB) is not bundled: with it the project would not fit one
# 64 MiB transfer, and example_tests, its only user, has no CUDA case (the GPU
# check leaves it to `make test`).
# Writes DIR/MANIFEST (packages and versions, files left out) and prints the size,
# which must stay under 40 MiB. Run again to refresh; the download cache is
# DIR.debs.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-build/gpu-bundle}
limit_mib=40
arch=$(dpkg --print-architecture)
multiarch=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || gcc -print-multiarch)
lib=usr/lib/$multiarch

# What every image has (the C and C++ runtimes): never bundled, never hidden.
base_sonames="libc.so.6 libm.so.6 libdl.so.2 libpthread.so.0 librt.so.1 libutil.so.1 \
libstdc++.so.6 libgcc_s.so.1 ld-linux-x86-64.so.2 libz.so.1"
# Network fabrics a single machine does not use: whatever needs them is left out.
fabric_sonames_re='^(libucp|libucs|libucm|libuct|libfabric|libibverbs|librdmacm|libpsm|libpsm2|libpsm_infinipath|libnl-3|libnl-route-3|libgfortran|libjvm)\.'
packages=(libboost-program-options1.74-dev libboost-program-options1.74.0 libgtest-dev
          libopenmpi-dev libopenmpi3 openmpi-bin openmpi-common zlib1g-dev fortunes
          fortunes-min nlohmann-json3-dev)

debs=$out.debs
stage=$out.stage
rm -rf "$out" "$stage"
mkdir -p "$out" "$stage" "$debs"

updated=0
fetch() { (cd "$debs" && { apt-get download -qq "$1:$arch" 2>/dev/null || apt-get download -qq "$1"; }); }
download() {  # packages -> $debs (quiet; each once)
  local pkg
  for pkg in "$@"; do
    ls "$debs/${pkg}_"*.deb > /dev/null 2>&1 && continue
    fetch "$pkg" && continue
    if ((!updated)); then  # images often ship without package lists
      updated=1
      SUDO=""
      [ "$(id -u)" -eq 0 ] || SUDO="sudo"
      $SUDO apt-get update -qq > /dev/null 2>&1 || true
      fetch "$pkg" && continue
    fi
    echo "gpu-bundle: apt-get download $pkg failed (is a Debian package repository reachable?)" >&2
    exit 1
  done
}

# Boost headers: the closure of what the sources include, from libboost1.74-dev.
# (every source of the tree, whatever its folder)
boost_headers=$(find . \( -path ./build -o -path './bazel-*' -o -path ./.git \) -prune -o \
                  \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' \) -print0 |
                xargs -0 grep -hoE '#include <boost/[^>]+>' | sort -u)
printf '%s\n' "$boost_headers" > "$stage/boost.cpp"
boost_files=$(g++ -std=c++17 -M -x c++ "$stage/boost.cpp" | tr ' \\' '\n\n' | grep '^/usr/include/boost/' | sort -u)
boost_pkg=$(dpkg -S /usr/include/boost/version.hpp | cut -d: -f1)
download "$boost_pkg"
mkdir -p "$stage/boost-dev"
dpkg -x "$debs/${boost_pkg}_"*.deb "$stage/boost-dev"
for f in $boost_files; do
  mkdir -p "$out/$(dirname "${f#/}")"
  cp -p "$stage/boost-dev$f" "$out/${f#/}"
done
# The whole config folder: its choice of headers depends on the compiler.
cp -rp "$stage/boost-dev/usr/include/boost/config" "$out/usr/include/boost/"
# Boost's CMake package (find_package(Boost) in config mode), which lives there too.
mkdir -p "$out/$lib/cmake"
cp -rp "$stage/boost-dev/$lib/cmake/"* "$out/$lib/cmake/"

# The packages, then what their programs and libraries load, until nothing is missing.
todo=("${packages[@]}")
declare -A have=()
while ((${#todo[@]})); do
  download "${todo[@]}"
  for pkg in "${todo[@]}"; do
    dpkg -x "$debs/${pkg}_"*.deb "$out"
    have[$pkg]=1
  done
  todo=()
  # sonames every ELF file in the bundle needs and nothing in it provides
  provided=" $base_sonames $(find "$out" \( -type f -o -type l \) -name '*.so*' -printf '%f ') "
  needed=$(find "$out" -type f \( -perm -u+x -o -name '*.so*' \) -print0 |
           { xargs -0 -r readelf -d 2>/dev/null || true; } | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | sort -u)
  for soname in $needed; do
    [[ "$provided" == *" $soname "* ]] && continue
    [[ "$soname" =~ $fabric_sonames_re ]] && continue
    path=$(ldconfig -p | awk -v s="$soname" '$1 == s && /x86-64/ && !found {print $NF; found = 1}')  # no early exit: no SIGPIPE
    [ -n "$path" ] || { echo "gpu-bundle: nothing on this machine provides $soname" >&2; exit 1; }
    pkg=$(dpkg -S "$(readlink -f "$path")" 2>/dev/null | head -1 | cut -d: -f1) ||
      pkg=$(dpkg -S "$path" | head -1 | cut -d: -f1)
    [ -n "${have[$pkg]:-}" ] || todo+=("$pkg")
  done
  mapfile -t todo < <(printf '%s\n' "${todo[@]}" | sort -u | sed '/^$/d')
done

# Leave out what needs a network fabric (and, in turn, what needs that), and what
# no program of ours uses (documentation, Fortran, Java, OpenSHMEM).
rm -rf "$out/usr/share/doc" "$out/usr/share/man" "$out/usr/share/lintian" "$out/usr/share/bug"
left_out=()
for f in $(find "$out" -type f \( -name 'liboshmem*' -o -name 'libmpi_java*' -o -name 'libmpi_mpifh*' \
           -o -name 'libmpi_usempi*' -o -name 'mpi.mod' -o -name '*.jar' \)); do
  left_out+=("${f#$out/}"); rm -f "$f"
done
changed=1
while ((changed)); do
  changed=0
  provided=" $base_sonames $(find "$out" \( -type f -o -type l \) -name '*.so*' -printf '%f ') "
  while IFS= read -r -d '' f; do
    for soname in $({ readelf -d "$f" 2>/dev/null || true; } | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
      if [[ "$provided" != *" $soname "* ]] && ! [[ " $base_sonames " == *" $soname "* ]]; then
        left_out+=("${f#$out/} (needs $soname)"); rm -f "$f"; changed=1; break
      fi
    done
  done < <(find "$out" -type f \( -perm -u+x -o -name '*.so*' \) -print0)
done
# Dangling links (to what was left out) go too.
find "$out" -xtype l -delete

# Debian's alternatives (set up by maintainer scripts, which dpkg -x does not run).
ln -sf mpirun.openmpi "$out/usr/bin/mpirun"
ln -sf mpiexec.openmpi "$out/usr/bin/mpiexec"
ln -sf mpicc.openmpi "$out/usr/bin/mpicc"
ln -sf openmpi/lib/libmpi.so "$out/$lib/libmpi.so"
mkdir -p "$out/usr/include/$multiarch"
ln -sfn ../../lib/$multiarch/openmpi/include "$out/usr/include/$multiarch/mpi"

{
  echo "# torchfabric GPU bundle, made $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(. /etc/os-release; echo "$PRETTY_NAME") ($arch)"
  echo "# packages (name version); Boost headers: $(echo "$boost_files" | wc -w) included by the sources, from $boost_pkg"
  for pkg in $(printf '%s\n' "${!have[@]}" "$boost_pkg" | sort -u); do
    dpkg-deb -W --showformat='${Package} ${Version}\n' "$(ls "$debs/${pkg}_"*.deb)"
  done
  echo "# left out (network fabrics, Fortran, Java, OpenSHMEM)"
  printf '%s\n' "${left_out[@]}"
} > "$out/MANIFEST"
rm -rf "$stage"
size=$(du -sb "$out" | cut -f1)
size_mib=$(( (size + 1048575) / 1048576 ))
echo "gpu-bundle: $out: $size_mib MiB ($size bytes), $(grep -vc '^#' "$out/MANIFEST") manifest lines"
if [ "$size" -gt $((limit_mib * 1048576)) ]; then
  echo "gpu-bundle: $out is larger than $limit_mib MiB: it and the project would not fit one transfer" >&2
  exit 1
fi
