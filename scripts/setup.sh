#!/usr/bin/env bash
# Installs what torchfabric needs when it is missing; quiet and quick when all is
# there. Idempotent. Called by `make run`, `make test` and `make bench`.
#   Debian packages: Bazel (bazel-bootstrap + the mock rule repositories in
#     bazel-bootstrap-source), CMake, g++, GoogleTest, Boost.Program_options, zlib,
#     Open MPI, the Fashion-MNIST data and the fortunes text (examples/gpt), and
#     SLURM with munge and its PMIx plugin (the test cluster of scripts/slurm_cluster.sh).
#   pip: torch==2.11.0 (a CUDA 13.0 build that also runs without a GPU), numpy,
#     lightning==2.6.6 and tensorboard (Python comparisons and read-backs in tests
#     and benchmarks), into $PYTHON
#     (default python3).
# The CUDA 13.0 toolkit is expected on the machine (CMake's find_package(Torch)
# needs nvcc); it is checked, not installed.
set -euo pipefail

PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.11.0
PACKAGES=(bazel-bootstrap bazel-bootstrap-source cmake g++ make libgtest-dev googletest
          libboost-program-options-dev zlib1g-dev libopenmpi-dev openmpi-bin
          dataset-fashion-mnist fortunes strace iproute2 nlohmann-json3-dev
          slurmd slurmctld slurm-client munge slurm-wlm-basic-plugins)

missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" > /dev/null
fi

# torch and lightning in one pip command, so pip never upgrades torch to satisfy
# lightning; lightning is used only by tests and benchmarks (Python comparisons).
LIGHTNING_VERSION=2.6.6
if ! "$PYTHON" -c "import torch, lightning, numpy, tensorboard, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' and lightning.__version__ == '$LIGHTNING_VERSION' else 1)" \
    > /dev/null 2>&1; then
  echo "setup: installing torch==$TORCH_VERSION lightning==$LIGHTNING_VERSION into $("$PYTHON" -c 'import sys; print(sys.executable)')"
  "$PYTHON" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
    "torch==$TORCH_VERSION" "lightning==$LIGHTNING_VERSION" numpy tensorboard
fi

if ! command -v nvcc > /dev/null 2>&1 && [ ! -x /usr/local/cuda/bin/nvcc ]; then
  echo "setup: warning: no CUDA toolkit (nvcc) found; the CMake build needs it" \
       "(find_package(Torch) of pip's CUDA build). The Bazel build does not." >&2
fi
