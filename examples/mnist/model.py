"""The CNN of ``examples/mnist/run.yaml``: three conv-BN-ReLU blocks (28 -> 14 -> 7 pixels), a linear classifier.

Pruning half of every conv's output channels removes about three quarters of the conv
weights and half of the classifier's; int8 then stores each remaining weight in one byte.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MnistNet", "build"]


class MnistNet(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, stride=2)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(2 * width, 4 * width, 3, padding=1, stride=2)
        self.bn3 = nn.BatchNorm2d(4 * width)
        self.relu3 = nn.ReLU()
        # A 7x7 conv over the 7x7 map computes flatten + Linear; kept as a conv so that the
        # recorded results of this example stay comparable between sessions.
        self.fc = nn.Conv2d(4 * width, 10, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        return self.fc(x).flatten(1)


def build(width: int = 32) -> MnistNet:
    """The model factory named in ``run.yaml`` (a fresh, untrained model)."""
    return MnistNet(width)
