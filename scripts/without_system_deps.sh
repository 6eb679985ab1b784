#!/usr/bin/env bash
# without_system_deps.sh BUNDLE COMMAND...: runs COMMAND in a mount namespace where
# this machine's own copies of what the GPU bundle (scripts/gpu_bundle.sh) holds
# are hidden, as on a bare GPU image: every file of the bundle that also exists
# under / is covered by an empty file, and the folders only those packages fill
# (Boost's and GoogleTest's headers, Open MPI's and PMIx's trees) by empty ones.
# A file missing from the bundle then fails here, not on the GPU machine.
# The C and C++ runtimes and libz.so.1 stay (the image has them, and this
# machine's own tools need them), and so does data (the fortunes text). Needs root (unshare -m); exit status 77 without.
set -euo pipefail
bundle=$(cd "$1" && pwd)
shift
if [ "$(id -u)" != 0 ] || ! unshare -m true 2> /dev/null; then
  echo "without_system_deps.sh: needs root and mount namespaces (unshare -m)" >&2
  exit 77
fi
[ -f "$bundle/MANIFEST" ] || { echo "without_system_deps.sh: $bundle is not a GPU bundle (no MANIFEST)" >&2; exit 1; }
export WSD_BUNDLE=$bundle
exec unshare -m --propagation private bash -c '
  set -euo pipefail
  keep="^/(usr/)?lib/[^/]+/(libc|libm|libdl|libpthread|librt|libutil|libstdc\+\+|libgcc_s|ld-linux-x86-64|libz)\.so"
  empty_dir=$(mktemp -d) empty_file=$(mktemp)
  hidden=0
  for dir in /usr/include/boost /usr/include/gtest /usr/include/gmock \
             /usr/lib/x86_64-linux-gnu/openmpi /usr/lib/x86_64-linux-gnu/pmix2 \
             /usr/share/openmpi /usr/share/pmix /etc/openmpi /usr/lib/x86_64-linux-gnu/cmake/GTest; do
    [ -d "$dir" ] && mount --bind "$empty_dir" "$dir" && hidden=$((hidden + 1))
  done
  for dir in /usr/lib/x86_64-linux-gnu/cmake/[Bb]oost*; do
    [ -d "$dir" ] && mount --bind "$empty_dir" "$dir" && hidden=$((hidden + 1))
  done
  while IFS= read -r -d "" f; do
    sys=${f#$WSD_BUNDLE}
    [[ "$sys" =~ $keep ]] && continue
    [[ "$sys" == /usr/share/games/* ]] && continue  # data (fortunes), not a build dependency
    # through links to the file they name (mount --bind follows them anyway)
    target=$(readlink -f "$sys" 2> /dev/null) || continue
    [ -f "$target" ] || continue
    [[ "$target" =~ $keep ]] && continue
    mount --bind "$empty_file" "$target" 2> /dev/null && hidden=$((hidden + 1))
  done < <(find "$WSD_BUNDLE/usr" \( -type f -o -type l \) -print0)
  echo "without_system_deps.sh: $hidden system files and folders hidden"
  exec "$@"
' without_system_deps "$@"
