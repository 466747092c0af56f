"""Entry point of the built-in pruning plugin: its methods and the pruning defaults."""

from __future__ import annotations

from torch import nn

from compress_core import PluginRegistry, hookimpl

from .level import LevelPruner
from .movement import MovementPruner
from .norm import FPGMPruner, L1NormPruner, L2NormPruner
from .schedule import AGPPruner, LinearPruner
from .slim import SlimPruner
from .taylor import TaylorPruner

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
    registry.add_method(
        "l1_norm",
        L1NormPruner,
        summary="structured pruning by the L1 norm of each channel/block (Li et al. 2017)",
        aliases=("L1NormPruner",),
    )
    registry.add_method(
        "l2_norm",
        L2NormPruner,
        summary="structured pruning by the L2 norm of each channel/block",
        aliases=("L2NormPruner",),
    )
    registry.add_method(
        "fpgm",
        FPGMPruner,
        summary="prunes the filters nearest the geometric median of their layer (He et al. 2019)",
        aliases=("FPGMPruner",),
    )
    registry.add_method(
        "slim",
        SlimPruner,
        summary="trains per-channel scaling factors with an L1 penalty, prunes the smallest (Liu et al. 2017)",
        aliases=("SlimPruner",),
    )
    registry.add_method(
        "taylor",
        TaylorPruner,
        summary="first-order Taylor importance (w * grad)^2 accumulated while training (Molchanov et al. 2019)",
        aliases=("TaylorPruner", "TaylorFOWeightPruner"),
    )
    registry.add_method(
        "movement",
        MovementPruner,
        summary="trainable movement scores with a cubic sparsity schedule (Sanh et al. 2020)",
        aliases=("MovementPruner",),
    )
    registry.add_method(
        "linear",
        LinearPruner,
        summary="raises another pruner's ratios linearly over interval_steps x total_times steps",
        aliases=("LinearPruner",),
    )
    registry.add_method(
        "agp",
        AGPPruner,
        summary="automated gradual pruning: another pruner's ratios follow 1 - (1 - t/T)^3",
        aliases=("AGPPruner",),
    )


@hookimpl
def compress_register_defaults(registry: PluginRegistry) -> None:
    registry.add_default_targets(
        "pruning", _WEIGHT_AND_BIAS, {"weight": _RATIO_TARGET, "bias": _ALIGNED_BIAS}
    )
    registry.add_default_targets("pruning", (nn.Embedding,), {"weight": _RATIO_TARGET})
