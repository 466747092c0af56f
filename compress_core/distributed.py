"""Reductions across ``torch.distributed`` ranks that are no-ops in a single process.

Data-dependent pruning statistics (Taylor importance, slim factors, movement scores, observed
activations) differ between ranks that see different data; reducing them before a mask is
computed makes every rank end with the same masks.
"""

from __future__ import annotations

import torch

__all__ = ["all_reduce_mean_", "all_reduce_sum_", "is_distributed", "world_size"]


def is_distributed() -> bool:
    """Whether ``torch.distributed`` is available and a process group is initialised."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of ranks (1 outside a process group)."""
    if not is_distributed():
        return 1
    import torch.distributed as dist

    return dist.get_world_size()


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place; returns it. No-op outside a process group."""
    if is_distributed():
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over all ranks, in place; returns it. No-op outside a process group.

    Integer tensors are summed then floor-divided; use floating point for exact means.
    """
    if is_distributed():
        all_reduce_sum_(tensor)
        size = world_size()
        if tensor.is_floating_point() or tensor.is_complex():
            tensor.div_(size)
        else:
            tensor.floor_divide_(size)
    return tensor
