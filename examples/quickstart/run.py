"""Quick start: train a small CNN on real handwritten digits, prune it, show what changed.

Uses scikit-learn's bundled 8x8 digits (1,797 real images; no download). Trains for a few
seconds, then prunes with the ``level`` method at several sparsities from the same config
file, fine-tunes briefly through the user's own loop (masks stay applied, the optimizer built
before pruning keeps working), and prints accuracy and per-layer sparsity.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import compress_core
from compress_core.cli import load_config

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from models import DigitsCNN  # noqa: E402  (the example's own module, next to this file)


def load_digits_tensors(seed: int = 0):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    split = int(0.8 * len(y))
    return (x[:split], y[:split]), (x[split:], y[split:])


def train(model: nn.Module, data, epochs: int, lr: float, optimizer=None, after_step=None) -> None:
    x, y = data
    optimizer = optimizer or torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=generator).split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
            if after_step:
                after_step()


@torch.no_grad()
def accuracy(model: nn.Module, data) -> float:
    model.eval()
    x, y = data
    return (model(x).argmax(1) == y).float().mean().item() * 100


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(HERE / "prune.yaml"))
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    print("== plugins ==")
    for method in compress_core.list_methods():
        print(f"  {method['name']:<10} {method['kind']:<13} {method['summary']} (plugin '{method['plugin']}')")

    train_data, test_data = load_digits_tensors()
    model = DigitsCNN()
    start = time.perf_counter()
    train(model, train_data, epochs=args.epochs, lr=3e-3)
    dense_acc = accuracy(model, test_data)
    dense_params = sum(p.numel() for p in model.parameters())
    print(f"\n== trained DigitsCNN on {len(train_data[1])} real digits in {time.perf_counter() - start:.1f} s: "
          f"test accuracy {dense_acc:.1f}% ({dense_params} parameters) ==")

    config_list = load_config(args.config)
    print(f"\n== pruning with 'level', config {args.config} ==")
    print("| scale | weight sparsity | accuracy after pruning | after 2 epochs fine-tuning |")
    print("|---|---|---|---|")
    final = None
    for scale in (0.5, 1.0, 1.3):
        pruned = copy.deepcopy(model)
        scaled = [
            {**entry, "sparse_ratio": min(0.99, entry["sparse_ratio"] * scale)} for entry in config_list
        ]
        optimizer = torch.optim.Adam(pruned.parameters(), lr=1e-3)  # built before create: still valid
        comp = compress_core.create("level", pruned, scaled)
        masks = comp.compress()
        kept = sum(int(m["weight"].sum()) for m in masks.values())
        total = sum(m["weight"].numel() for m in masks.values())
        acc_pruned = accuracy(pruned, test_data)
        train(pruned, train_data, epochs=2, lr=1e-3, optimizer=optimizer)
        acc_tuned = accuracy(pruned, test_data)
        print(f"| {scale:.1f} | {1 - kept / total:.1%} | {acc_pruned:.1f}% | {acc_tuned:.1f}% |")
        if scale == 1.0:
            final = (pruned, masks)

    pruned, masks = final
    print("\n== per-layer sparsity at the configured ratios (after fine-tuning, masks applied) ==")
    print("| layer | shape | weight sparsity | bias sparsity |")
    print("|---|---|---|---|")
    for name, targets in masks.items():
        weight = targets["weight"]
        bias = targets.get("bias")
        bias_text = f"{1 - bias.float().mean().item():.1%}" if bias is not None else "-"
        print(f"| {name} | {list(weight.shape)} | {1 - weight.float().mean().item():.1%} | {bias_text} |")
    compress_core.unwrap(pruned, bake=True)
    zeros = sum(int((p == 0).sum()) for n, p in pruned.named_parameters() if n.endswith("weight") and "bn" not in n)
    print(f"\nunwrapped with bake=True: {zeros} weights are exactly zero; test accuracy {accuracy(pruned, test_data):.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
