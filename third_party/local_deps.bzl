"""Repository rules that bring in dependencies installed on this machine.

LibTorch comes from pip's torch wheel in $PYTHON (default python3): its headers are
symlinked into the repository and its libraries linked by absolute -L/-rpath, so
that pip's $ORIGIN-relative run paths to the nvidia-* CUDA libraries keep working
(Bazel's _solib_ symlinks would break them).
"""

def _torch_repository_impl(ctx):
    python = ctx.os.environ.get("PYTHON", "python3")
    python_path = ctx.which(python) if "/" not in python else ctx.path(python)
    if python_path == None:
        fail("torchfabric: no `%s` on PATH; run `make setup`" % python)
    result = ctx.execute([
        python_path,
        "-c",
        "import os, sys, torch; print(os.path.dirname(torch.__file__)); print(sys.executable); print(torch.__version__)",
    ])
    if result.return_code != 0:
        fail("torchfabric: `%s -c 'import torch'` failed; run `make setup` (it installs torch==2.11.0).\n%s" %
             (python, result.stderr))
    lines = result.stdout.strip().split("\n")
    torch_dir, executable, version = lines[-3], lines[-2], lines[-1]
    if not version.startswith("2.11."):
        print("torchfabric is pinned to torch 2.11; found %s in %s" % (version, executable))
    lib = torch_dir + "/lib"
    ctx.symlink(torch_dir + "/include", "include")
    cuda_home = ctx.os.environ.get("CUDA_HOME", "/usr/local/cuda")
    ctx.symlink(cuda_home + "/include", "cuda_include")
    ctx.file("BUILD.bazel", """
package(default_visibility = ["//visibility:public"])

cc_library(
    name = "torch",
    hdrs = glob(["include/**/*.h", "include/**/*.hpp"]),
    includes = ["include", "include/torch/csrc/api/include"],
    linkopts = [
        "-L{lib}",
        "-Wl,-rpath,{lib}",
        # Keep the CUDA libraries even though no symbol is referenced directly: they
        # register LibTorch's CUDA backend at load time.
        "-Wl,--no-as-needed",
        "-ltorch_cuda",
        "-lc10_cuda",
        "-Wl,--as-needed",
        "-ltorch",
        "-ltorch_cpu",
        "-lc10",
        "-pthread",
    ],
)

# The CUDA toolkit's headers, for the one file that includes ProcessGroupNCCL.hpp.
cc_library(
    name = "cuda_headers",
    hdrs = glob(["cuda_include/*.h", "cuda_include/crt/*.h", "cuda_include/crt/*.hpp"]),
    includes = ["cuda_include"],
)

# The interpreter that holds this torch, for tests that compare with Python.
cc_library(
    name = "python_path",
    defines = ['TORCHFABRIC_PYTHON=\\\\"{executable}\\\\"'],
)
""".format(lib = lib, executable = executable))

torch_repository = repository_rule(
    implementation = _torch_repository_impl,
    environ = ["PYTHON", "PATH", "CUDA_HOME"],
    local = True,
)

def _coverage_tools_stub_impl(ctx):
    ctx.file("WORKSPACE", "workspace(name = \"remote_coverage_tools\")\n")
    ctx.file("BUILD", """# Stand-in for the coverage tools Bazel would download: torchfabric does not run
# `bazel coverage`, but Bazel 4 resolves this repository for every test.
package(default_visibility = ["//visibility:public"])

filegroup(name = "coverage_report_generator", srcs = [])

filegroup(name = "lcov_merger", srcs = [])
""")

coverage_tools_stub = repository_rule(implementation = _coverage_tools_stub_impl, local = True)
