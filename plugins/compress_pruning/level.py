"""``level``: magnitude pruning (Zhu & Gupta, "To prune, or not to prune", 2017).

The metric is ``|w|``; with a block granularity it is the mean ``|w|`` of each block, and on
inputs/outputs the mean ``|x|`` per channel observed while the model ran.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from compress_core import Pruner, TargetRecord
from compress_core.masks import block_reduce


class LevelPruner(Pruner):
    default_granularity: ClassVar[str] = "element"

    def metric(self, record: TargetRecord, value: torch.Tensor, block: tuple[int, ...]) -> torch.Tensor:
        return block_reduce(value.abs(), block, "mean")
