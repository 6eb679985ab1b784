#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets (tests/fuzz/README.md).

    python3 tests/fuzz/make_seeds.py [OUT_DIR]      # default build/fuzz

OUT_DIR/seeds-checkpoint/  whole torch.save files (what checkpoint_fuzz reads)
OUT_DIR/seeds-pickle/      the data.pkl of each of them, followed by the trailer
                           pickle_fuzz.cpp reads (its storage records' sizes)
OUT_DIR/seeds-dcp/         .metadata files of distributed checkpoints (dcp_fuzz)

Each seed is a real file Python writes: a small module's state_dict (an
OrderedDict with _metadata), an optimizer's state_dict, tensors of many dtypes
(uint16/uint32/uint64/float8 included), views sharing a storage, nested dicts,
lists and tuples, a self-referencing list, strings and bytes, an
argparse.Namespace, torch.Size/dtype/device values, a protocol-4 pickle.
Seeds are small (a few KiB) so that libFuzzer's -max_len covers them.
"""

import argparse
import collections
import io
import os
import struct
import sys
import zipfile

import torch


def seeds():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2), torch.nn.ReLU())
    yield "module_state_dict", net.state_dict()

    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    yield "adam_state_dict", opt.state_dict()
    sgd = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    sgd.step()
    yield "sgd_state_dict", sgd.state_dict()
    yield "lightning_like", {
        "state_dict": net.state_dict(),
        "optimizer_states": [opt.state_dict()],
        "epoch": 3,
        "global_step": 120,
        "hyper_parameters": {"lr": 1e-3, "name": "run"},
    }

    dtypes = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
              torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
              torch.complex64, torch.complex128, torch.uint16, torch.uint32, torch.uint64,
              torch.float8_e4m3fn, torch.float8_e5m2]
    tensors = {}
    for dt in dtypes:
        name = str(dt).replace("torch.", "")
        try:
            tensors[name] = torch.arange(6).reshape(2, 3).to(dt)
        except (RuntimeError, TypeError):
            tensors[name] = torch.zeros(2, 3, dtype=dt)
    yield "dtypes", tensors
    for name, t in tensors.items():
        yield "tensor_" + name, t

    base = torch.arange(12, dtype=torch.float32)
    yield "shared_views", {"base": base, "view": base[2:8].view(2, 3), "t": base.view(3, 4).t(),
                           "strided": base[::3], "again": base}
    yield "scalar_and_empty", [torch.tensor(3.5), torch.empty(0), torch.empty(2, 0, 3),
                               torch.tensor([], dtype=torch.int64)]
    yield "parameter", torch.nn.Parameter(torch.ones(2, 2))
    yield "nested", {"a": [1, 2, (3, 4.5, "five"), {"b": {"c": [None, True, False]}}],
                     "t": (torch.ones(1),), 7: "int key", -2**40: 2**62, "neg": -1,
                     "float": float("inf"), "big": 2**63 - 1, "small": -2**63}
    l = []
    l.append(l)
    yield "self_list", l
    d = {}
    d["self"] = d
    yield "self_dict", d
    shared = [1, 2]
    yield "shared_list", {"x": shared, "y": shared, "z": (shared, shared)}
    yield "strings", {"ascii": "hello", "unicode": "h\u00e9llo \u2603 \U0001F600",
                      "empty": "", "long": "x" * 300, "bytes": b"\x00\x01\xff",
                      "bytearray": bytearray(b"abc")}
    yield "namespace", {"args": argparse.Namespace(lr=0.1, layers=[1, 2], name="n"),
                        "epoch": 1}
    yield "ordered_dict", collections.OrderedDict([("z", 1), ("a", torch.zeros(2))])
    yield "torch_values", {"size": torch.Size([2, 3]), "dtype": torch.float16,
                           "device": torch.device("cuda", 1), "cpu": torch.device("cpu")}
    yield "sets", {"set": {1, 2, 3}, "frozen": frozenset(["a"])}
    nest = []
    cur = nest
    for _ in range(50):
        nxt = []
        cur.append(nxt)
        cur = nxt
    yield "deep50", nest
    # Types our reader leaves to LibTorch's unpickler (read_checkpoint's fallback).
    yield "quantized", {"q": torch.quantize_per_tensor(torch.randn(4), 0.1, 10, torch.quint8)}
    yield "sparse", {"s": torch.eye(3).to_sparse()}
    yield "int_scalar", 42
    yield "none", None
    yield "string_top", "top"


def pickle_trailer(z, mapped):
    """pickle_fuzz.cpp's trailer: the sizes of data/0 .. data/n-1, then a flags
    byte (n in bits 0-4, bit 7: read through a MappedFile)."""
    sizes = {}
    for info in z.infolist():
        parts = info.filename.split("/")
        if len(parts) == 3 and parts[1] == "data" and parts[2].isdigit():
            sizes[int(parts[2])] = info.file_size
    n = max(sizes) + 1 if sizes else 0
    if n > 31:
        raise SystemExit(f"a seed with {n} storages; pickle_fuzz describes at most 31")
    trailer = b"".join(struct.pack("<I", sizes.get(i, 0) % (64 << 10)) for i in range(n))
    return trailer + bytes([n | (0x80 if mapped else 0)])


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "build/fuzz"
    ckpt_dir = os.path.join(out, "seeds-checkpoint")
    pkl_dir = os.path.join(out, "seeds-pickle")
    os.makedirs(ckpt_dir, exist_ok=True)
    os.makedirs(pkl_dir, exist_ok=True)
    count = 0
    for name, value in seeds():
        variants = [("", {}), ("_p4", {"pickle_protocol": 4})]
        if name in ("module_state_dict", "nested", "dtypes"):
            variants.append(("_newzip", {"_use_new_zipfile_serialization": True}))
        for suffix, kwargs in variants:
            buf = io.BytesIO()
            torch.save(value, buf, **kwargs)
            data = buf.getvalue()
            with open(os.path.join(ckpt_dir, name + suffix + ".pt"), "wb") as f:
                f.write(data)
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                pkl = next(n for n in z.namelist() if n.endswith("/data.pkl"))
                with open(os.path.join(pkl_dir, name + suffix + ".pkl"), "wb") as f:
                    f.write(z.read(pkl) + pickle_trailer(z, mapped=bool(suffix)))
            count += 1
    print(f"wrote {count} seeds each into {ckpt_dir} and {pkl_dir}")
    dcp_seeds(os.path.join(out, "seeds-dcp"))


def dcp_seeds(dcp_dir):
    """The .metadata of distributed checkpoints dcp.save really writes (one
    process, no process group): tensors of several dtypes and shapes, nested
    dicts and lists, plain values."""
    import tempfile
    import torch.distributed.checkpoint as dcp
    os.makedirs(dcp_dir, exist_ok=True)
    states = {
        "model": {"model": {"fc.weight": torch.randn(3, 4), "fc.bias": torch.zeros(3)}},
        "optimizer": {"optimizer": {"state": {"fc.weight": {"step": torch.tensor(3.0),
                                                            "exp_avg": torch.ones(3, 4)}},
                                    "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": ["fc.weight"]}]}},
        "dtypes": {k: torch.ones(2, 2, dtype=d) for k, d in
                   [("f16", torch.float16), ("bf16", torch.bfloat16), ("i64", torch.int64), ("b", torch.bool)]},
        "scalars": {"step": 5, "name": "run", "t": torch.tensor(1.5)},
    }
    for name, state in states.items():
        with tempfile.TemporaryDirectory() as tmp:
            dcp.save(state, checkpoint_id=tmp, no_dist=True)
            with open(os.path.join(tmp, ".metadata"), "rb") as f, \
                 open(os.path.join(dcp_dir, name + ".metadata"), "wb") as g:
                g.write(f.read())
    print(f"wrote {len(states)} seeds into {dcp_dir}")


if __name__ == "__main__":
    main()
