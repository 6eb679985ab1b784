"""The Python twin of benchmarks/gpu (gpu_bench): examples/gpt's model (the Gpt
of benchmarks/vs_lightning/vs_lightning.py) trained by Lightning Fabric 2.6 with
AdamW in bf16-mixed on random token windows kept on the device, one device.
Prints `seconds/step: X` after a warm-up, as the C++ side does."""
import argparse
import os
import sys
import time

import torch
from lightning.fabric import Fabric
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "vs_lightning"))
from vs_lightning import Gpt  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--accelerator", default="cuda")
    for name in ("n-layer", "n-head", "n-embd", "block-size", "batch-size", "steps"):
        parser.add_argument("--" + name, type=int, required=True)
    args = parser.parse_args()
    fabric = Fabric(accelerator=args.accelerator, devices=1, precision="bf16-mixed")
    fabric.launch()
    torch.manual_seed(0)
    model = Gpt(block=args.block_size, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    model, optimizer = fabric.setup(model, optimizer)
    windows = 64
    data = fabric.to_device(torch.randint(0, 256, (windows, args.block_size + 1)))
    at = 0

    def step():
        nonlocal at
        idx = torch.arange(at, at + args.batch_size, device=data.device) % windows
        at += args.batch_size
        window = data.index_select(0, idx)
        x, y = window[:, :-1], window[:, 1:]
        optimizer.zero_grad()
        logits = model(x)
        fabric.backward(nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)))
        optimizer.step()

    cuda = args.accelerator == "cuda"
    for _ in range(max(3, args.steps // 5)):
        step()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    print("seconds/step: %.9f" % ((time.perf_counter() - start) / args.steps))


if __name__ == "__main__":
    main()
