"""Entry point of the built-in quantization plugin."""

from __future__ import annotations

import torch.nn as nn

from compress_core import PluginRegistry, hookimpl

_TARGET = {"quant_dtype": "int8", "quant_scheme": None, "granularity": "default"}

_COMPUTE = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
_ACTIVATIONS = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
    nn.ELU,
)


@hookimpl
def compress_register_defaults(registry: PluginRegistry) -> None:
    # The bias stays float: at export it becomes int32 with scale input_scale * weight_scale.
    registry.add_default_targets(
        "quantization", _COMPUTE, {"_input_": _TARGET, "weight": _TARGET, "_output_": _TARGET}
    )
    registry.add_default_targets("quantization", _ACTIVATIONS, {"_input_": _TARGET, "_output_": _TARGET})
