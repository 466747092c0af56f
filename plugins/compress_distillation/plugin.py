"""Entry point of the built-in distillation plugin: its methods and the distillation default."""

from __future__ import annotations

from torch import nn

from compress_core import PluginRegistry, hookimpl

from .adaptive1d_layerwise import Adaptive1dLayerwiseDistiller
from .dynamic_layerwise import DynamicLayerwiseDistiller


@hookimpl
def compress_register_methods(registry: PluginRegistry) -> None:
    registry.add_method(
        "dynamic_layerwise",
        DynamicLayerwiseDistiller,
        summary="layer-wise distillation; with several teacher links the smallest loss counts",
        aliases=("DynamicLayerwiseDistiller",),
    )
    registry.add_method(
        "adaptive1d_layerwise",
        Adaptive1dLayerwiseDistiller,
        summary="layer-wise distillation through a trainable Linear adapter where widths differ",
        aliases=("Adaptive1dLayerwiseDistiller",),
    )


@hookimpl
def compress_register_defaults(registry: PluginRegistry) -> None:
    # nn.Module is the last class of every module's MRO: any module distils its output.
    registry.add_default_targets(
        "distillation", (nn.Module,), {"_output_": {"lambda": 1.0, "link": None, "apply_method": "mse"}}
    )
