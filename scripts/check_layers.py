#!/usr/bin/env python3
"""Checks the library's layer order from the #include lines (make test runs it).

Each folder may include only itself and the folders of lower layers:
    util < accelerators < precision < optim < data < checkpoint < strategies
         < launchers < loggers < fabric
(precision: numeric policy; optim: optimizers and their fused kernels, which
take precision's loss-scaling step; data: data sets and their file readers;
checkpoint: PyTorch's file formats and the State types, below the strategies so
that consolidate_checkpoint links nothing else; strategies place modules on
ranks; launchers start ranks and may name strategies in their help; loggers
write metrics (atomic files from checkpoint); fabric is the facade over everything). Programs (examples, benchmarks, tools, tests) may
include any layer. Prints each include that breaks the order and exits 1.
"""
import glob
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = ["util", "accelerators", "precision", "optim", "data", "checkpoint", "strategies",
          "launchers", "loggers", "fabric"]


def main():
    rank = {name: i for i, name in enumerate(LAYERS)}
    problems = []
    for folder in LAYERS:
        for path in sorted(glob.glob(os.path.join(ROOT, folder, "**", "*"), recursive=True)):
            if not path.endswith((".h", ".cpp", ".cu", ".cuh")):
                continue
            with open(path, errors="replace") as f:
                for number, line in enumerate(f, 1):
                    m = re.match(r'\s*#\s*include\s+"([^"/]+)/', line)
                    if not m or m.group(1) not in rank:
                        continue
                    if rank[m.group(1)] > rank[folder]:
                        problems.append("%s:%d includes %s, a higher layer than %s"
                                        % (os.path.relpath(path, ROOT), number, line.strip().split()[-1], folder))
    if problems:
        print("layers: %d include(s) against the order %s:" % (len(problems), " < ".join(LAYERS)))
        for p in problems:
            print("  " + p)
        return 1
    print("layers: every include follows %s" % " < ".join(LAYERS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
