"""A DenseNet-style dense block (Huang et al., 2017): each layer's output is concatenated to
its input on the channel dim, then a transition (BN-ReLU-1x1 conv, average pooling)."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["DenseBlockNet", "DenseLayer"]


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv (bottleneck) then BN-ReLU-3x3 conv giving ``growth`` new channels."""

    def __init__(self, cin: int, growth: int, bottleneck: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, bottleneck * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bottleneck * growth)
        self.conv2 = nn.Conv2d(bottleneck * growth, growth, 3, padding=1, bias=False)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        new = self.conv2(self.relu(self.norm2(self.conv1(self.relu(self.norm1(x))))))
        return torch.cat([x, new], dim=1)


class DenseBlockNet(nn.Module):
    """Stem conv, one dense block of ``layers`` layers, a transition and a linear classifier."""

    def __init__(self, in_channels: int = 3, stem: int = 16, growth: int = 8, layers: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, stem, 3, padding=1, bias=False)
        self.block = nn.Sequential(*[DenseLayer(stem + i * growth, growth) for i in range(layers)])
        width = stem + layers * growth
        self.transition = nn.Sequential(nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, width // 2, 1, bias=False), nn.AvgPool2d(2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width // 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transition(self.block(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))
