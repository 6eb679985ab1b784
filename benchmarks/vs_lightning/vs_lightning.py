"""The Python side of benchmarks/vs_lightning: one model's training loop in
Lightning Fabric 2.6 on the CPU, 1 thread, fp32, SGD, random data in a
TensorDataset behind a torch DataLoader (shuffled). Prints `steps/s: X`.
The model definitions mirror the C++ side's exactly (same layers and shapes)."""
import argparse
import time

import torch
from lightning.fabric import Fabric
from torch import nn


def make_model(name):
    if name == "mlp":  # examples/classifier's ClassifierImpl
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Dropout(0.2),
                             nn.Linear(512, 256), nn.ReLU(), nn.Dropout(0.2), nn.Linear(256, 10))
    if name == "convnet":  # Lightning's small-model parity ConvNet
        return nn.Sequential(nn.Conv2d(3, 6, 5), nn.ReLU(), nn.MaxPool2d(2, 2), nn.Conv2d(6, 16, 5),
                             nn.ReLU(), nn.MaxPool2d(2, 2), nn.Flatten(), nn.Linear(16 * 5 * 5, 120),
                             nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))
    raise SystemExit("unknown model " + name)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    shape = (784,) if args.model == "mlp" else (3, 32, 32)
    n = 2048
    data = torch.utils.data.TensorDataset(torch.randn(n, *shape), torch.randint(0, 10, (n,)))
    fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
    fabric.launch()
    model = make_model(args.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model, optimizer = fabric.setup(model, optimizer)
    loader = fabric.setup_dataloaders(torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True))
    model.train()

    def run(steps):
        done = 0
        while done < steps:
            for x, y in loader:
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                fabric.backward(loss)
                optimizer.step()
                done += 1
                if done == steps:
                    return

    run(max(5, args.steps // 10))  # warm-up
    start = time.perf_counter()
    run(args.steps)
    print("steps/s: %.3f" % (args.steps / (time.perf_counter() - start)))


if __name__ == "__main__":
    main()
