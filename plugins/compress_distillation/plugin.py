"""Entry point of the built-in distillation plugin."""

from __future__ import annotations

import torch.nn as nn

from compress_core import PluginRegistry, hookimpl


@hookimpl
def compress_register_defaults(registry: PluginRegistry) -> None:
    # nn.Module is the last class of every module's MRO: any module distils its output.
    registry.add_default_targets(
        "distillation", (nn.Module,), {"_output_": {"lambda": 1.0, "link": None, "apply_method": "mse"}}
    )
