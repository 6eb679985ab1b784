# torchfabric entry points; each sets up what is missing first (scripts/setup.sh).
#   make run    build, then train the Fashion-MNIST autoencoder (the main job)
#   make test   build with Bazel and CMake, run every test; last line `N passed, N failed`
#   make bench  build, then run the benchmarks (results: docs/benchmarks.md)
#   make gpu-check  on a machine with an NVIDIA GPU: CMake build, the test programs
#               with the CUDA tests (none may skip), the GPU benchmarks; without a
#               GPU it says so, exit 0. GPU_BUNDLE=DIR takes the build's packages
#               from a bundle (make gpu-bundle), GPU_OUT=DIR gets logs and results
#   make gpu-bundle  gather those packages (Debian's files) into GPU_BUNDLE
#               (default build/gpu-bundle), for a bare GPU image
#   make install PREFIX=DIR  install headers, libraries, fabric-run and the CMake
#               package (find_package(TorchFabric)) into DIR (CMake build)
#   make fuzz   build the libFuzzer targets of tests/fuzz/ (clang) and run each for
#               FUZZ_SECONDS (60); findings in build/fuzz/findings-*
# ARGS="..." passes extra flags to the example, e.g. make run ARGS="--max-steps 50".
PYTHON ?= python3
BAZEL ?= bazel
ARGS ?=
PREFIX ?= /usr/local
FUZZ_SECONDS ?= 60
GPU_BUNDLE ?=
GPU_OUT ?=
export PYTHON

.PHONY: all setup build run test bench install clean gpu-check gpu-bundle fuzz
all: build

setup:
	@scripts/setup.sh

build: setup
	$(BAZEL) build //...

# Builds only what it runs.
run: setup
	$(BAZEL) build //examples/autoencoder
	@mkdir -p build
	./bazel-bin/examples/autoencoder/autoencoder --checkpoint build/autoencoder.pt --log-dir build/logs $(ARGS)

test: setup
	@scripts/run_tests.sh

bench: build
	./bazel-bin/benchmarks/overhead/overhead_bench
	./bazel-bin/benchmarks/ddp/ddp_bench
	./bazel-bin/benchmarks/ddp/ddp_bench --batch-size 256
	./bazel-bin/benchmarks/fsdp/fsdp_bench
	./bazel-bin/benchmarks/deepspeed/deepspeed_bench
	./bazel-bin/benchmarks/fused/fused_bench
	./bazel-bin/benchmarks/vs_lightning/vs_lightning_bench --python $(PYTHON)
	./bazel-bin/benchmarks/checkpoint/checkpoint_bench --python $(PYTHON)
	./bazel-bin/benchmarks/checkpoint/sharded_checkpoint_bench --python $(PYTHON)
	./bazel-bin/benchmarks/gpu/gpu_bench --python $(PYTHON)

# No set-up: the GPU machines have CMake, nvcc and torch but no network (see the script).
gpu-check:
	@scripts/gpu_check.sh $(if $(GPU_BUNDLE),--bundle $(GPU_BUNDLE)) $(if $(GPU_OUT),--out $(GPU_OUT))

# Debian's apt-get download and dpkg -x; on a Debian machine of ours (see the script).
gpu-bundle:
	@scripts/gpu_bundle.sh $(or $(GPU_BUNDLE),build/gpu-bundle)

# Needs clang and torch only (no Bazel); see tests/fuzz/README.md.
fuzz:
	@scripts/fuzz.sh $(FUZZ_SECONDS)

install: setup
	cmake -S . -B build/cmake -DCMAKE_PREFIX_PATH="$$($(PYTHON) -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	cmake --build build/cmake -j2 --target torchfabric fabric-run consolidate_checkpoint
	cmake --install build/cmake --prefix "$(PREFIX)"

clean:
	$(BAZEL) clean
	rm -rf build
