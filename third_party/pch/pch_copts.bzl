"""The copts that make a target load //third_party/pch:torch first (pch.bzl)."""

TORCH_PCH_COPTS = ["-include", "third_party/pch/torch.h"]
