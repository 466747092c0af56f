"""``random``: prune blocks chosen at random (a baseline for comparing pruning metrics).

Every block of a target gets a score drawn from ``U[0, 1)``; the usual pruning keys
(``sparse_ratio``, ``sparse_threshold``, groups, ``granularity``, ``align``, ...) then apply
to it exactly as to a magnitude metric, because :class:`compress_core.Pruner` handles them.

The scores depend only on ``seed`` and on the target's name, not on the weights nor on
torch's global random state, so a run is reproducible, two targets get different draws, and
a schedule that raises the ratio step by step keeps what it masked before (nested masks).
"""

from __future__ import annotations

import hashlib
from typing import ClassVar

import attrs
import torch

from compress_core import Pruner, TargetRecord


@attrs.frozen(kw_only=True)
class RandomParams:
    """Keyword parameters of ``random`` (``create('random', model, config_list, seed=3)``)."""

    seed: int = 0
    """Seed of the scores; the same seed gives the same masks on the same model."""


class RandomPruner(Pruner):
    """Scores each block with a seeded random number; the lowest-scored blocks are masked."""

    # Unstructured by default, like ``level``: the baseline for element-wise pruning.
    default_granularity: ClassVar[str] = "element"
    params_cls: ClassVar[type | None] = RandomParams

    def metric(
        self, record: TargetRecord, value: torch.Tensor, block: tuple[int, ...]
    ) -> torch.Tensor:
        grid = tuple(size // b for size, b in zip(value.shape, block))
        generator = torch.Generator().manual_seed(_target_seed(self.params.seed, record))
        # Drawn on the CPU so that the masks do not depend on the device either.
        scores = torch.rand(grid, generator=generator, dtype=torch.float64)
        return scores.to(device=value.device, dtype=torch.float32)


def _target_seed(seed: int, record: TargetRecord) -> int:
    # A stable hash (Python's hash() of a str changes between processes).
    text = f"{seed}:{record.module_name}:{record.target_name}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & ((1 << 63) - 1)
