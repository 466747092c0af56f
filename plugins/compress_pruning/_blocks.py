"""Block helpers shared by the pruning methods: float expansion and per-block vectors."""

from __future__ import annotations

import torch
from torch import nn


def grid_shape(shape: tuple[int, ...], block: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(s // b for s, b in zip(shape, block))


def expand_grid(grid: torch.Tensor, block: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
    """A per-block tensor (factors, scores) made broadcastable to ``shape``, keeping autograd.

    Dims whose block spans the whole dim stay size 1 and broadcast; partial blocks repeat.
    """
    out = grid
    for dim, (s, b) in enumerate(zip(shape, block)):
        if 1 < b < s:
            out = out.repeat_interleave(b, dim=dim)
    return out


def block_vectors(t: torch.Tensor, block: tuple[int, ...]) -> torch.Tensor:
    """``t`` as one row per block: shape ``(number of blocks, elements per block)``.

    Rows are in the row-major order of the block grid, so ``rows.reshape(grid)`` lines up.
    """
    split: list[int] = []
    grid_dims: list[int] = []
    member_dims: list[int] = []
    for s, b in zip(t.shape, block):
        grid_dims.append(len(split))
        member_dims.append(len(split) + 1)
        split.extend((s // b, b))
    blocks = t.reshape(split).permute(*grid_dims, *member_dims)
    n_blocks = 1
    for s, b in zip(t.shape, block):
        n_blocks *= s // b
    return blocks.reshape(n_blocks, -1)


def state(module: nn.Module, name: str) -> torch.Tensor:
    """A tensor a pruner registered on ``module`` (a trainable parameter or a buffer)."""
    value: torch.Tensor | None = module._parameters.get(name)
    if value is None:
        value = module._buffers.get(name)
    if value is None:
        raise RuntimeError(f"{type(module).__name__} has no compression state '{name}'")
    return value


def trainable(module: nn.Module, name: str) -> nn.Parameter:
    """A trainable tensor a pruner registered on ``module``."""
    value = module._parameters.get(name)
    if value is None:
        raise RuntimeError(f"{type(module).__name__} has no trainable compression state '{name}'")
    return value
