"""The Python side of benchmarks/vs_lightning: one model's training loop in
Lightning Fabric 2.6 on the CPU, 1 thread, fp32, SGD, random data in a
TensorDataset behind a torch DataLoader (shuffled). Prints `steps/s: X`.
The model definitions mirror the C++ side's exactly (same layers and shapes)."""
import argparse
import time

import torch
from lightning.fabric import Fabric
from torch import nn


class Block(nn.Module):  # examples/gpt's GptBlockImpl
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.qkv, self.proj = nn.Linear(n_embd, 3 * n_embd), nn.Linear(n_embd, n_embd)
        self.fc, self.fc_proj = nn.Linear(n_embd, 4 * n_embd), nn.Linear(4 * n_embd, n_embd)

    def attn(self, x):
        b, t, c = x.shape
        q, k, v = (p.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
                   for p in self.qkv(x).split(c, 2))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).contiguous().view(b, t, c))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.fc_proj(nn.functional.gelu(self.fc(self.ln_2(x))))


class Gpt(nn.Module):  # examples/gpt's GptImpl at its defaults (tied head)
    def __init__(self, vocab=256, block=64, n_layer=4, n_head=4, n_embd=128):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, n_embd), nn.Embedding(block, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.t()


def make_model(name):
    if name == "gpt":
        return Gpt()
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
    n = 2048
    if args.model == "gpt":  # random byte windows and their next-byte targets
        data = torch.utils.data.TensorDataset(torch.randint(0, 256, (n, 64)), torch.randint(0, 256, (n, 64)))
    else:
        shape = (784,) if args.model == "mlp" else (3, 32, 32)
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
                out = model(x)
                loss = nn.functional.cross_entropy(out.reshape(-1, out.size(-1)), y.reshape(-1))
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
