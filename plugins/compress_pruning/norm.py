"""One-shot, data-free structured pruning by filter norms and by the geometric median.

* ``l1_norm``: Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017 -- the metric of a
  block is the sum of ``|w|`` over it;
* ``l2_norm``: the same with the Euclidean norm of the block;
* ``fpgm``: He et al., "Filter Pruning via Geometric Median", CVPR 2019 -- filters closest to the
  geometric median of their layer are the most replaceable; the metric of a block is the sum of
  its Euclidean distances to every other block of the target.

On inputs/outputs the norm methods rank channels by the observed activations: ``l1_norm`` by
the mean ``|x|``, ``l2_norm`` by the root mean square of ``x``.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from compress_core import ConfigError, Pruner, TargetRecord
from compress_core.masks import block_reduce

from ._blocks import block_vectors, grid_shape

# Rows of the distance matrix computed at once: bounds FPGM's memory to _CHUNK x blocks.
_CHUNK = 1024


class L1NormPruner(Pruner):
    default_granularity: ClassVar[str] = "out_channel"

    def metric(self, record: TargetRecord, value: torch.Tensor, block: tuple[int, ...]) -> torch.Tensor:
        if not record.target.is_tensor_attribute:
            return value  # already the mean |x| per channel
        return block_reduce(value.abs(), block, "sum")


class L2NormPruner(Pruner):
    default_granularity: ClassVar[str] = "out_channel"
    activation_statistic: ClassVar[str | None] = "square"

    def metric(self, record: TargetRecord, value: torch.Tensor, block: tuple[int, ...]) -> torch.Tensor:
        if not record.target.is_tensor_attribute:
            return value.sqrt()  # value is the mean x**2 per channel
        return block_reduce(value, block, "l2")


class FPGMPruner(Pruner):
    default_granularity: ClassVar[str] = "out_channel"
    prunes_activations: ClassVar[bool] = False

    def validate(self) -> None:
        super().validate()
        for record in self.records:
            if record.settings.align is None and self.granularity(record) == "element":
                raise ConfigError(
                    "fpgm ranks blocks (filters) by their distance to the others; "
                    "use out_channel, in_channel or a block shape, not element",
                    entry=record.entry,
                    key=f"target_settings.{record.target_name}.granularity",
                    module=record.module_name,
                )

    def metric(self, record: TargetRecord, value: torch.Tensor, block: tuple[int, ...]) -> torch.Tensor:
        rows = block_vectors(value.to(torch.float32), block)
        sums = torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device)
        for start in range(0, rows.shape[0], _CHUNK):
            sums[start : start + _CHUNK] = torch.cdist(rows[start : start + _CHUNK], rows, compute_mode="donot_use_mm_for_euclid_dist").sum(1)
        return sums.reshape(grid_shape(tuple(value.shape), block))
