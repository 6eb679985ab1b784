"""What a Bazel workspace needs to depend on torchfabric, in one macro.

In your WORKSPACE (Bazel 4.2.3, offline; torchfabric checked out or unpacked at PATH):

    local_repository(name = "torchfabric", path = "PATH")
    load("@torchfabric//:deps.bzl", "torchfabric_dependencies")
    torchfabric_dependencies()

and in your .bazelrc `import PATH/.bazelrc` (C++20, and Debian's mock rule
repositories for a Bazel that cannot download). Then depend on "@torchfabric//fabric"
(and "@torchfabric//optim:fused" for the fused optimizers).

The repositories keep the names torchfabric's BUILD files use (@libtorch, @openmpi);
one your workspace already declares under that name is left as it is. Labels here
are Label()s, so they resolve inside torchfabric's repository, not the caller's.
"""

load("//third_party:local_deps.bzl", "coverage_tools_stub", "torch_repository")

def torchfabric_dependencies():
    existing = native.existing_rules()

    # LibTorch from pip's torch in $PYTHON (default python3).
    if "libtorch" not in existing:
        torch_repository(name = "libtorch")

    # Open MPI's C API from Debian's libopenmpi-dev.
    if "openmpi" not in existing:
        native.new_local_repository(
            name = "openmpi",
            build_file = str(Label("//third_party:openmpi.BUILD")),
            path = "/usr/lib/x86_64-linux-gnu/openmpi",
        )

    # Bazel 4 resolves this for every test; only `bazel coverage` uses it.
    if "remote_coverage_tools" not in existing:
        coverage_tools_stub(name = "remote_coverage_tools")
