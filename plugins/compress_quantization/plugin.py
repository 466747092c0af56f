"""Entry point of the built-in quantization plugin: its methods and the quantization defaults."""

from __future__ import annotations

from torch import nn

from compress_core import PluginRegistry, hookimpl

from .methods import Bnn, DoReFa, Lsq, LsqPlus, Ptq, Qat

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
def compress_register_methods(registry: PluginRegistry) -> None:
    registry.add_method(
        "ptq",
        Ptq,
        summary="post-training quantization: calibrate by running data, then freeze",
        aliases=("PtqQuantizer",),
    )
    registry.add_method(
        "qat",
        Qat,
        summary="quantization-aware training: fake quantization with a straight-through estimator",
        aliases=("QATQuantizer",),
    )
    registry.add_method(
        "lsq",
        Lsq,
        summary="learned step size quantization (trainable scales)",
        aliases=("LsqQuantizer",),
    )
    registry.add_method(
        "lsq_plus",
        LsqPlus,
        summary="LSQ+: learned scales and zero points",
        aliases=("LsqPlusQuantizer",),
    )
    registry.add_method(
        "dorefa",
        DoReFa,
        summary="DoReFa-Net k-bit weights and activations",
        aliases=("DoReFaQuantizer",),
    )
    registry.add_method(
        "bnn", Bnn, summary="binarized weights and activations (sign)", aliases=("BNNQuantizer",)
    )


@hookimpl
def compress_register_defaults(registry: PluginRegistry) -> None:
    # The bias stays float: at export it becomes int32 with scale input_scale * weight_scale.
    registry.add_default_targets(
        "quantization", _COMPUTE, {"_input_": _TARGET, "weight": _TARGET, "_output_": _TARGET}
    )
    registry.add_default_targets(
        "quantization", _ACTIVATIONS, {"_input_": _TARGET, "_output_": _TARGET}
    )
