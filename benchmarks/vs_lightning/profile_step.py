"""Where a small training step's time goes on the Python side: the Lightning
Fabric loop of vs_lightning.py (same model, data, SGD, 1 thread) under
torch.profiler, split into time inside ATen operators (what the C++ side runs
too) and the rest (Python, Lightning's wrappers, the DataLoader's collation).
    python3 benchmarks/vs_lightning/profile_step.py --model convnet --batch-size 4
Prints the time per step (unprofiled, and profiled with the share spent inside
ATen operators' own code), and the top operators. The profiler adds its own cost
per operator, so the share is an estimate."""
import argparse
import time

import torch
from lightning.fabric import Fabric
from torch import nn
from torch.profiler import ProfilerActivity, profile

import vs_lightning


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="convnet")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    n = 2048
    shape = (784,) if args.model == "mlp" else (3, 32, 32)
    data = torch.utils.data.TensorDataset(torch.randn(n, *shape), torch.randint(0, 10, (n,)))
    fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
    fabric.launch()
    model = vs_lightning.make_model(args.model)
    model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.01))
    loader = fabric.setup_dataloaders(torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True))

    def run(steps):
        done = 0
        while done < steps:
            for x, y in loader:
                optimizer.zero_grad()
                fabric.backward(nn.functional.cross_entropy(model(x), y))
                optimizer.step()
                done += 1
                if done == steps:
                    return

    run(50)
    start = time.perf_counter()
    run(args.steps)
    wall = (time.perf_counter() - start) / args.steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        run(args.steps)
        profiled_wall = (time.perf_counter() - start) / args.steps
    events = prof.key_averages()
    # Top-level ATen operators only (self time of aten:: ops sums to the time spent in ATen).
    aten = sum(e.self_cpu_time_total for e in events if e.key.startswith("aten::")) / 1e6 / args.steps
    print(f"{args.model} batch {args.batch_size}: {wall * 1e3:.3f} ms/step unprofiled; profiled "
          f"{profiled_wall * 1e3:.3f} ms/step of which {aten * 1e3:.3f} ms in ATen operators "
          f"({aten / profiled_wall:.0%})")
    top = sorted((e for e in events if e.key.startswith("aten::")), key=lambda e: -e.self_cpu_time_total)[:8]
    for e in top:
        print(f"  {e.key:40s} {e.self_cpu_time_total / args.steps:8.1f} us/step  x{e.count // args.steps}")


if __name__ == "__main__":
    main()
