"""The built-in quantization methods: ptq, qat, lsq, lsq_plus, dorefa, bnn."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, ClassVar

import attrs
import torch
from torch import nn

from compress_core import TargetRecord
from compress_core.config import int_at_least
from compress_core.quantization import (
    QuantParams,
    affine_qparams,
    fake_quantize,
    fake_quantize_learnable,
    quant_range,
)
from compress_core.wrapper import ModuleWrapper

from .quantizer import QuantHandler, Quantizer, QuantizerParams, row_range, state

__all__ = ["Bnn", "DoReFa", "Lsq", "LsqPlus", "Ptq", "Qat"]


class Ptq(Quantizer):
    """Post-training quantization: observe while the user runs calibration data, then freeze.

    Before :meth:`compress` the model computes in float and only records ranges; afterwards
    every target is fake-quantized with the frozen scales and zero points.
    """

    def configure(self, handler: QuantHandler) -> None:
        handler.observing = True
        handler.quantizing = False


def _decay(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"must be in [0, 1), got {value}")


@attrs.frozen(kw_only=True)
class QatParams(QuantizerParams):
    quant_start_step: int = attrs.field(default=0, validator=int_at_least(0))
    """Fake quantization starts after this many ``comp.step()`` calls (observers run from 0)."""
    ema_decay: float = attrs.field(default=0.99, validator=_decay)
    """EMA decay of activation ranges; the first observed range is taken as is."""


class Qat(Quantizer):
    """Quantization-aware training with straight-through fake quantization.

    Activation ranges are tracked by EMA in training mode; weight ranges are the current
    weight's (it changes every step and is fully known, so an EMA would only lag and clip).
    """

    params_cls: ClassVar[type | None] = QatParams
    needs_training: ClassVar[bool] = True

    def __init__(
        self, model: nn.Module, records: list[TargetRecord], params: Any, *, method: str
    ) -> None:
        super().__init__(model, records, params, method=method)
        self.steps = 0
        self.frozen = False

    def configure(self, handler: QuantHandler) -> None:
        handler.ema = self.params.ema_decay
        handler.track_current = True

    def observing(self, handler: QuantHandler, module: nn.Module) -> bool:
        if self.frozen:
            return False
        return handler.is_parameter or module.training

    def quantizing(self, handler: QuantHandler) -> bool:
        return self.frozen or self.steps >= self.params.quant_start_step

    def step(self) -> None:
        self.steps += 1

    def freeze(self) -> None:
        super().freeze()
        self.frozen = True


class _LearnedHandler(QuantHandler):
    """LSQ/LSQ+: scale (and zero point) are trainable, initialised from the first batch."""

    plus = False

    def quantize(self, module: nn.Module, value: torch.Tensor) -> torch.Tensor:
        scale = state(module, self.names["scale"])
        zero_point = self._zero_point(module)
        seen = state(module, self.names["observed"])
        if int(seen) == 0 and not torch.onnx.is_in_onnx_export():
            self.initialise(value.detach(), scale, zero_point)
            seen.add_(1)
        params = self.quant_params(module)
        per_scale = max(1, value.numel() // max(1, scale.numel()))
        # LSQ's gradient scale g = 1/sqrt(N * Qp) keeps step-size updates on the weights' scale.
        grad_factor = 1.0 / math.sqrt(per_scale * max(abs(self.qmax), abs(self.qmin)))
        return fake_quantize_learnable(value, scale, zero_point, params, grad_factor)

    def initialise(
        self, value: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor
    ) -> None:
        with torch.no_grad():
            rows = self.reduce_dims(value.to(torch.float32))
            if self.plus:
                lo, hi = row_range(rows)
                s, z = affine_qparams(lo, hi, self.qmin, self.qmax)
                zero_point.copy_(z.reshape(zero_point.shape))
            else:
                # LSQ paper's initialisation: 2 * mean|x| / sqrt(Qp).
                s = 2 * rows.abs().mean(1) / math.sqrt(self.qmax - float(zero_point.flatten()[0]))
            scale.copy_(s.clamp_min(1e-8).reshape(scale.shape))

    def observed(self, module: nn.Module) -> bool:
        return True


class _LsqPlusHandler(_LearnedHandler):
    plus = True


class Lsq(Quantizer):
    """Learned step size quantization (Esser et al., 2020): the scale is trained by backprop.

    The scales are in :meth:`parameters` (add them to the optimizer); the zero point is the
    symmetric one. Quantization is on from the first forward, which initialises the scale.
    """

    handler_cls: ClassVar[type[QuantHandler]] = _LearnedHandler
    learn_zero_point: ClassVar[bool] = False
    needs_training: ClassVar[bool] = True

    def validate(self) -> None:
        super().validate()
        for record in self.records:
            axis, block = self._layout[(record.module_name, record.target_name)]
            if block is not None or (axis is not None and not record.target.is_tensor_attribute):
                raise self._error(
                    record,
                    f"target_settings.{record.target_name}.granularity",
                    f"'{self.method}' learns per-tensor scales, or per-channel scales of parameters",
                )

    def init_state(
        self,
        module: nn.Module,
        wrapper: ModuleWrapper,
        record: TargetRecord,
        handler: QuantHandler,
        grid: tuple[int, ...],
        device: torch.device,
    ) -> None:
        kind = self.kind
        handler.names["scale"] = wrapper.register_state(
            module,
            record.target_name,
            kind,
            "scale",
            torch.ones(grid, device=device),
            trainable=True,
        )
        qmin, qmax = quant_range(record.settings.quant_dtype)
        zero = float((qmax + qmin + 1) // 2) if handler.scheme == "symmetric" else 0.0
        handler.names["zero_point"] = wrapper.register_state(
            module,
            record.target_name,
            kind,
            "zero_point",
            torch.full(grid, zero, device=device),
            trainable=self.learn_zero_point,
        )

    def configure(self, handler: QuantHandler) -> None:
        handler.observing = False
        handler.quantizing = True

    def parameters(self) -> Iterator[nn.Parameter]:
        for (module_name, _), handler in self.handlers.items():
            module = self._modules[module_name]
            for name in ("scale", "zero_point"):
                tensor = module._parameters.get(handler.names[name])
                if tensor is not None:
                    yield tensor

    def freeze(self) -> None:
        for handler in self.handlers.values():
            handler.quantizing = True


class LsqPlus(Lsq):
    """LSQ+ (Bhalgat et al., 2020): learned scale and learned zero point (affine)."""

    handler_cls: ClassVar[type[QuantHandler]] = _LsqPlusHandler
    learn_zero_point: ClassVar[bool] = True
    default_scheme: ClassVar[str] = "affine"


class _FixedHandler(QuantHandler):
    """A handler whose quantization grid is fixed by the method (DoReFa, BNN)."""

    def observed(self, module: nn.Module) -> bool:
        return True

    def levels(self) -> int:
        bits = int(self.record.settings.quant_dtype.lstrip("uint"))
        return 2**bits - 1


class _DoReFaHandler(_FixedHandler):
    def transform(self, value: torch.Tensor) -> torch.Tensor:
        n = self.levels()
        if self.is_parameter:
            # DoReFa-Net (Zhou et al., 2016), eq. 9: w_q = 2 quantize_k(tanh w / (2 max|tanh w|) + 1/2) - 1.
            t = torch.tanh(value)
            t = t / (2 * t.detach().abs().max().clamp_min(1e-12)) + 0.5
            q = t + (torch.round(t * n) / n - t).detach()
            return 2 * q - 1
        x = value.clamp(0, 1)
        return x + (torch.round(x * n) / n - x).detach()

    def __call__(self, module: nn.Module, value: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return fake_quantize(self.export_value(module, value), self.quant_params(module))
        return self.transform(value)

    def bake(self, module: nn.Module, value: torch.Tensor) -> torch.Tensor:
        return self.transform(value)

    def quant_params(self, module: nn.Module) -> QuantParams:
        n = self.levels()
        # Weights take the odd integers in [-n, n] times 1/n; activations [0, n] times 1/n.
        qmin = -n if self.is_parameter else 0
        return QuantParams(
            scale=torch.tensor(1.0 / n),
            zero_point=torch.tensor(0.0),
            qmin=qmin,
            qmax=n,
            quant_dtype=self.record.settings.quant_dtype,
            quant_scheme="dorefa",
        )

    def export_value(self, module: nn.Module, value: torch.Tensor) -> torch.Tensor:
        return self.transform(value) if self.is_parameter else value

    def import_value(self, module: nn.Module, dequantized: torch.Tensor) -> torch.Tensor:
        # tanh is invertible on (-1, 1); the DoReFa transform of the result reproduces it.
        return torch.atanh(dequantized.clamp(-0.999999, 0.999999))


class _BnnHandler(_FixedHandler):
    def transform(self, value: torch.Tensor) -> torch.Tensor:
        # BinaryNet (Courbariaux et al., 2016): sign with the hard-tanh straight-through estimator.
        clipped = value.clamp(-1, 1)
        binary = torch.where(value >= 0, torch.ones_like(value), -torch.ones_like(value))
        return clipped + (binary - clipped).detach()

    def __call__(self, module: nn.Module, value: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export() and self.is_parameter:
            return fake_quantize(self.transform(value), self.quant_params(module))
        return self.transform(value)

    def bake(self, module: nn.Module, value: torch.Tensor) -> torch.Tensor:
        return self.transform(value)

    def quant_params(self, module: nn.Module) -> QuantParams:
        return QuantParams(
            scale=torch.tensor(1.0),
            zero_point=torch.tensor(0.0),
            qmin=-1,
            qmax=1,
            quant_dtype=self.record.settings.quant_dtype,
            quant_scheme="binary",
        )

    def export_value(self, module: nn.Module, value: torch.Tensor) -> torch.Tensor:
        return self.transform(value)

    def import_value(self, module: nn.Module, dequantized: torch.Tensor) -> torch.Tensor:
        return dequantized


class _FixedQuantizer(Quantizer):
    # DoReFa and BNN replace weights by coarse levels; only training makes that model useful.
    needs_training: ClassVar[bool] = True

    def configure(self, handler: QuantHandler) -> None:
        handler.quantizing = True

    def result(self) -> dict[str, dict[str, dict[str, Any]]]:
        return super().result()


class DoReFa(_FixedQuantizer):
    """DoReFa-Net: k-bit weights through tanh normalisation, k-bit activations in [0, 1].

    k is the bit width of ``quant_dtype``; ``quant_scheme`` and the observer do not apply.
    """

    handler_cls: ClassVar[type[QuantHandler]] = _DoReFaHandler


class Bnn(_FixedQuantizer):
    """Binarized neural networks: weights and activations become sign(x) in {-1, +1}."""

    handler_cls: ClassVar[type[QuantHandler]] = _BnnHandler
