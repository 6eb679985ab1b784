#!/usr/bin/env python3
"""Checks that Bazel and CMake describe the same build (make test runs it):

- every C++ source a Bazel rule compiles is compiled by CMake, and every source
  CMake compiles is one a Bazel rule compiles;
- every Bazel binary and test has a CMake executable of the same name, and the
  other way round (install_tests excepted: it tests CMake's own package).

Bazel's BUILD files are run as Python with stand-ins for the rules (they are
Starlark, a Python subset), so globs and excludes count as Bazel sees them;
CMake's add_library/add_executable calls are read from CMakeLists.txt.
Prints what differs and exits 1, or prints one line and exits 0.
"""
import glob
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CMAKE_ONLY = {"install_tests"}  # tests find_package(TorchFabric) of the installed tree
SKIP_PACKAGES = ("tests/downstream/", "third_party/")  # another project's build; system libraries


def bazel_rules():
    rules = []  # (kind, label, name, sources)
    for build in sorted(glob.glob(os.path.join(ROOT, "**", "BUILD.bazel"), recursive=True)):
        package = os.path.relpath(os.path.dirname(build), ROOT)
        package = "" if package == "." else package
        if any((package + "/").startswith(p) for p in SKIP_PACKAGES) or package.startswith(("bazel-", "build")):
            continue

        def do_glob(include, exclude=(), **_):
            found = set()
            for pattern in include:
                for path in glob.glob(os.path.join(ROOT, package, pattern), recursive=True):
                    found.add(os.path.relpath(path, os.path.join(ROOT, package)))
            for pattern in exclude:
                for path in glob.glob(os.path.join(ROOT, package, pattern), recursive=True):
                    found.discard(os.path.relpath(path, os.path.join(ROOT, package)))
            return sorted(found)

        def rule(kind):
            def add(name, srcs=(), **_):
                sources = [os.path.join(package, s) for s in srcs if s.endswith((".cpp", ".cc", ".cu"))]
                rules.append((kind, "//%s:%s" % (package, name), name, sources))
            return add

        env = {"glob": do_glob, "package": lambda **_: None, "load": lambda *a, **k: None, "TORCH_PCH_COPTS": [],
               "cc_library": rule("library"), "cc_binary": rule("binary"), "cc_test": rule("test"),
               "select": lambda d: list(d.values())[0], "exports_files": lambda *a, **k: None,
               "filegroup": lambda **_: None, "sh_test": rule("sh"), "py_binary": lambda **_: None}
        with open(build) as f:
            exec(compile(f.read(), build, "exec"), env)
    return rules


def cmake_targets():
    with open(os.path.join(ROOT, "CMakeLists.txt")) as f:
        text = re.sub(r"#[^\n]*", "", f.read())
    targets = {}  # name -> (kind, sources)
    for kind, name, body in re.findall(r"\badd_(library|executable)\(\s*([\w.-]+)([^)]*)\)", text):
        words = body.split()
        if "IMPORTED" in words or "INTERFACE" in words or "ALIAS" in words:
            continue
        sources = [w for w in words if w.endswith((".cpp", ".cc", ".cu"))]
        targets[name] = (kind, sources)
    return targets


def main():
    rules = bazel_rules()
    targets = cmake_targets()
    problems = []
    bazel_sources = {}
    for kind, label, name, sources in rules:
        for s in sources:
            bazel_sources.setdefault(s, label)
    cmake_sources = {}
    for name, (kind, sources) in targets.items():
        if name in CMAKE_ONLY:
            continue
        for s in sources:
            cmake_sources.setdefault(s, name)
    for s, label in sorted(bazel_sources.items()):
        if s not in cmake_sources:
            problems.append("%s (in Bazel's %s) is not compiled by CMakeLists.txt" % (s, label))
    for s, name in sorted(cmake_sources.items()):
        if s not in bazel_sources:
            problems.append("%s (in CMake's %s) is in no Bazel rule" % (s, name))
    bazel_programs = {name: label for kind, label, name, _ in rules if kind in ("binary", "test")}
    cmake_programs = {name for name, (kind, _) in targets.items() if kind == "executable"}
    for name, label in sorted(bazel_programs.items()):
        if name not in cmake_programs:
            problems.append("Bazel's %s has no CMake executable named '%s'" % (label, name))
    for name in sorted(cmake_programs - set(bazel_programs) - CMAKE_ONLY):
        problems.append("CMake's executable '%s' has no Bazel binary or test of that name" % name)
    if problems:
        print("build parity: %d difference(s) between Bazel and CMake:" % len(problems))
        for p in problems:
            print("  " + p)
        return 1
    print("build parity: Bazel and CMake compile the same %d sources into the same %d programs"
          % (len(bazel_sources), len(bazel_programs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
