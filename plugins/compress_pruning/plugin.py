"""Entry point of the built-in pruning plugin: its methods and the pruning defaults."""

from __future__ import annotations

import torch.nn as nn

from compress_core import PluginRegistry, hookimpl

from .level import LevelPruner

# Every key is listed so that shorthand keys reach the weight (spec: "Common Keys in Config").
_RATIO_TARGET = {
    "sparse_ratio": None,
    "max_sparse_ratio": None,
    "min_sparse_ratio": None,
    "sparse_threshold": None,
    "global_group_id": None,
    "dependency_group_id": None,
    "granularity": "default",
    "internal_metric_block": None,
    "apply_method": "mul",
}
_ALIGNED_BIAS = {"align": {"target_name": "weight", "dims": [0]}, "apply_method": "mul"}

_WEIGHT_AND_BIAS = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
)


@hookimpl
def compress_register_methods(registry: PluginRegistry) -> None:
    registry.add_method(
        "level",
        LevelPruner,
        summary="element-wise magnitude pruning: masks the smallest |w|",
        aliases=("LevelPruner",),
    )


@hookimpl
def compress_register_defaults(registry: PluginRegistry) -> None:
    registry.add_default_targets(
        "pruning", _WEIGHT_AND_BIAS, {"weight": _RATIO_TARGET, "bias": _ALIGNED_BIAS}
    )
    registry.add_default_targets("pruning", (nn.Embedding,), {"weight": _RATIO_TARGET})
