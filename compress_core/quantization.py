"""Quantization math shared by the quantization plugins and the exporter.

The numbers are the ones fixed in ``design.md``: ``intN`` covers ``[-(2^(N-1)-1), 2^(N-1)-1]``
(symmetric around 0, so int8 is ``[-127, 127]``), ``uintN`` covers ``[0, 2^N-1]``; the symmetric
zero point is ``(qmax+qmin+1)//2`` (0 for int8, 128 for uint8); affine quantization uses
``scale=(max-min)/(qmax-qmin)`` and ``zero_point=qmin-round(min/scale)``.

:func:`fake_quantize` is what every quantization handler calls in forward. While
``torch.onnx.export`` traces the model it emits a QuantizeLinear/DequantizeLinear pair instead,
so the exporter (:mod:`compress_core.export`) needs no knowledge of any quantization method.
Handlers expose their parameters to the exporter and to the compact checkpoint through the
:class:`QuantizedTarget` protocol.
"""

from __future__ import annotations

import math
import re
import struct
from typing import Any, Protocol, runtime_checkable

import attrs
import torch
from torch import nn

__all__ = [
    "QuantParams",
    "QuantizedTarget",
    "affine_qparams",
    "fake_quantize",
    "qparams",
    "quant_range",
    "quantize",
    "symmetric_qparams",
    "symmetric_zero_point",
]

# A scale of exactly 0 (a constant-zero tensor) would divide by zero; ONNX also requires
# scale > 0.
MIN_SCALE = 1e-12

_FLOAT32 = struct.Struct("f")


def quant_range(quant_dtype: str) -> tuple[int, int]:
    """``(qmin, qmax)`` of ``intN`` / ``uintN``."""
    match = re.fullmatch(r"(u?)int([1-8])", quant_dtype)
    if match is None:
        raise ValueError(
            f"quant_dtype must be 'intN' or 'uintN' with N in 1..8, got {quant_dtype!r}"
        )
    bits = int(match.group(2))
    if match.group(1):
        return 0, 2**bits - 1
    return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1


def symmetric_zero_point(qmin: int, qmax: int) -> int:
    return (qmax + qmin + 1) // 2


def symmetric_qparams(
    min_val: torch.Tensor, max_val: torch.Tensor, qmin: int, qmax: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point covering ``[-amax, amax]`` around the symmetric zero point.

    The scale uses the shorter side of the range around the zero point (127 steps for both
    int8 and uint8), so no value within ``amax`` is clipped.
    """
    zero_point = symmetric_zero_point(qmin, qmax)
    steps = min(qmax - zero_point, zero_point - qmin)
    if steps < 1:
        raise ValueError(
            f"range [{qmin}, {qmax}] has no step on one side of the zero point {zero_point}"
        )
    amax = torch.maximum(min_val.abs(), max_val.abs()).to(torch.float32)
    scale = (amax / steps).clamp_min(MIN_SCALE)
    return scale, torch.full_like(scale, float(zero_point))


def affine_qparams(
    min_val: torch.Tensor, max_val: torch.Tensor, qmin: int, qmax: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``scale=(max-min)/(qmax-qmin)``, ``zero_point=qmin-round(min/scale)``.

    The range is widened to include 0 first, so that 0 (padding, ReLU outputs) is exact and
    the zero point lies in ``[qmin, qmax]``.
    """
    lo = torch.minimum(min_val, torch.zeros_like(min_val)).to(torch.float32)
    hi = torch.maximum(max_val, torch.zeros_like(max_val)).to(torch.float32)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(MIN_SCALE)
    zero_point = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return scale, zero_point


def qparams(
    min_val: torch.Tensor, max_val: torch.Tensor, qmin: int, qmax: int, scheme: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if scheme == "symmetric":
        return symmetric_qparams(min_val, max_val, qmin, qmax)
    if scheme == "affine":
        return affine_qparams(min_val, max_val, qmin, qmax)
    raise ValueError(f"quant_scheme must be 'affine' or 'symmetric', got {scheme!r}")


@attrs.frozen
class QuantParams:
    """Everything needed to quantize one target outside the simulated model.

    ``scale`` and ``zero_point`` are float tensors: scalars for per-tensor quantization,
    ``[C]`` along ``axis`` for per-channel; ``block`` is set for block granularities (which
    ONNX cannot express; see docs/quantization.md).
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int
    axis: int | None = None
    block: tuple[int, ...] | None = None
    quant_dtype: str = "int8"
    quant_scheme: str = "symmetric"

    @property
    def signed(self) -> bool:
        return self.qmin < 0

    def broadcast(self, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point shaped to broadcast against ``value``."""
        return _broadcast(value, self.scale, self.zero_point, self.axis, self.block)


@runtime_checkable
class QuantizedTarget(Protocol):
    """What a quantization handler offers the exporter and the compact checkpoint."""

    def quant_params(self, module: nn.Module) -> QuantParams:
        """The current (frozen) quantization parameters of this target."""

    def export_value(self, module: nn.Module, value: torch.Tensor) -> torch.Tensor:
        """The float tensor that is quantized for export (e.g. a BatchNorm-folded weight)."""

    def import_value(self, module: nn.Module, dequantized: torch.Tensor) -> torch.Tensor:
        """The parameter value whose :meth:`export_value` is ``dequantized`` (inverse folding)."""


def _broadcast(
    value: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    axis: int | None,
    block: tuple[int, ...] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    if block is not None:
        # One scale per block over the trailing dims: expand the block grid to the value.
        lead = value.dim() - len(block)
        for i, size in enumerate(block):
            scale = scale.repeat_interleave(size, dim=i)
            zero_point = zero_point.repeat_interleave(size, dim=i)
        grid = (1,) * lead + tuple(scale.shape)
        return scale.reshape(grid), zero_point.reshape(grid)
    if axis is None or scale.dim() == 0:
        return scale, zero_point
    shape = [1] * value.dim()
    shape[axis] = -1
    return scale.reshape(shape), zero_point.reshape(shape)


def quantize(value: torch.Tensor, params: QuantParams) -> torch.Tensor:
    """The integer values (as an int64 tensor) of ``value`` under ``params``."""
    scale, zero_point = params.broadcast(value)
    q = torch.round(value.detach().to(torch.float32) / scale) + zero_point
    return q.clamp(params.qmin, params.qmax).to(torch.int64)


def dequantize(q: torch.Tensor, params: QuantParams) -> torch.Tensor:
    scale, zero_point = params.broadcast(q)
    return (q.to(torch.float32) - zero_point) * scale


def fake_quantize(
    value: torch.Tensor,
    params: QuantParams,
    *,
    in_range: bool = False,
    value_range: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Quantize and dequantize ``value``; the gradient is the clipped straight-through estimate.

    Per-tensor matches torch's fused kernel (``fake_quantize_per_tensor_affine``) bit for bit;
    per-channel and blocks divide by the broadcast scale. During ONNX export this becomes
    QuantizeLinear/DequantizeLinear.

    ``in_range=True`` promises that no element of ``value`` lies outside the range the scale
    covers (e.g. a symmetric per-tensor scale computed from this very tensor's min/max), so
    the check for clipped elements is skipped on the fast CPU path; the result is the same.
    ``value_range`` (``lo, hi``) bounds ``value`` from below and above (e.g. the min/max just
    observed from it): per tensor on CPU, the clipping check is then two scalar products
    instead of a pass over the tensor; the result is the same.
    """
    if torch.onnx.is_in_onnx_export():
        return _export_qdq(value, params)
    per_tensor = params.block is None and (params.axis is None or params.scale.dim() == 0)
    fast = value.device.type == "cpu" and value.dtype == torch.float32 and value.numel() > 0
    if per_tensor and not fast:
        zero_point = params.zero_point.round().to(torch.int32).reshape(())
        scale = params.scale.to(torch.float32).reshape(())
        return torch.fake_quantize_per_tensor_affine(
            value, scale, zero_point, params.qmin, params.qmax
        )
    if per_tensor:
        # torch's fused CPU kernel is scalar code (~6 ns per element, and its bool-mask
        # backward as much again), the largest cost of a QAT step. The same arithmetic as
        # vectorized tensor ops: it multiplies by the float32 reciprocal of the scale, so this
        # is bitwise its result.
        # Python floats holding float32 values: a tensor op with a Python scalar casts it to
        # float32 exactly, and skips the slower tensor-by-0-dim-tensor path.
        step = _f32(float(params.scale))
        # 1/s in double rounded to float32 is the float32 quotient (double rounding is
        # innocuous for a division), i.e. torch.reciprocal's result.
        inv = _f32(1.0 / step) if step != 0.0 else math.copysign(math.inf, step)
        # Python's round() is half-to-even like torch.round, and costs no tensor op.
        zero = float(params.zero_point)
        if math.isfinite(zero):
            zero = float(round(zero))
        low, high = params.qmin - zero, params.qmax - zero
        if not in_range and value_range is not None:
            in_range = _range_in_grid(value_range, inv, low, high)
        return _PerTensorFakeQuantize.apply(value, step, inv, low, high, in_range)
    # Per-channel and blocks: torch's per-channel kernel is several times slower than
    # broadcast tensor ops on CPU.
    scale, zero_point = params.broadcast(value)
    return _BroadcastFakeQuantize.apply(
        value, scale.to(value.dtype), zero_point.round().to(value.dtype), params.qmin, params.qmax
    )


def _f32(x: float) -> float:
    """``x`` rounded to the nearest float32 (as a Python float)."""
    try:
        return _FLOAT32.unpack(_FLOAT32.pack(x))[0]
    except OverflowError:  # rounds beyond the largest float32
        return math.copysign(math.inf, x)


def _range_in_grid(value_range: tuple[float, float], inv: float, low: float, high: float) -> bool:
    """Whether ``round(x * inv)`` lies in ``[low, high]`` for every ``x`` in ``value_range``.

    ``x -> round(fl(x * inv))`` is monotonic for ``inv > 0``, so the grid values of the
    bounds are the grid range of everything between them. The product of two float32
    numbers is exact in double, so rounding it to float32 gives the float32 product the
    kernel computes.
    """
    lo, hi = value_range
    if not (inv > 0.0 and math.isfinite(inv)):
        return False
    q_lo, q_hi = _f32(lo * inv), _f32(hi * inv)
    if not (math.isfinite(q_lo) and math.isfinite(q_hi)):
        return False  # also NaN bounds
    return low <= round(q_lo) and round(q_hi) <= high


def _clip(q: torch.Tensor, low: float, high: float) -> torch.Tensor | None:
    """Clamp the integer grid ``q`` to ``[low, high]`` in place; the mask of unclipped elements.

    ``None`` when nothing is clipped, the usual case for weights (their range is the
    observed one): then one min/max pass replaces two comparisons, a clamp, and a mask
    multiply in backward.
    """
    if q.device.type == "cpu":
        # The check reads two numbers back; on an accelerator that would be a host sync.
        # amin + amax rather than aminmax: its full reduction is the slower one on CPU.
        lo, hi = q.amin(), q.amax()
        if float(lo) >= low and float(hi) <= high:
            return None
    inside = (q >= low) & (q <= high)
    q.clamp_(low, high)
    return inside


def _masked_grad(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
    if not ctx.clipped:
        return grad
    (inside,) = ctx.saved_tensors
    # A float mask: multiplying by a bool tensor takes a slow type-promoting path on CPU; the
    # product (including the sign of the zeros) is the same.
    return grad * inside.to(grad.dtype)


class _PerTensorFakeQuantize(torch.autograd.Function):
    """``(clamp(round(x * (1/s)), low, high)) * s`` with the clipped straight-through gradient.

    ``low``/``high`` are ``qmin - zero_point`` and ``qmax - zero_point``: on the integer grid,
    ``clamp(q + z, qmin, qmax) - z`` is exactly this. ``scale`` and ``inv = fl(1/s)`` are
    Python floats holding float32 values.
    """

    @staticmethod
    def forward(
        ctx: Any,
        value: torch.Tensor,
        scale: float,
        inv: float,
        low: float,
        high: float,
        in_range: bool = False,
    ) -> torch.Tensor:  # type: ignore[override]
        q = torch.mul(value, inv).round_()
        inside = None if in_range else _clip(q, low, high)
        ctx.clipped = inside is not None
        if inside is not None:
            ctx.save_for_backward(inside)
        return q.mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        return _masked_grad(ctx, grad), None, None, None, None, None


class _BroadcastFakeQuantize(torch.autograd.Function):
    """Fake quantization with broadcast scale/zero point; clipped straight-through gradient."""

    @staticmethod
    def forward(
        ctx: Any,
        value: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        qmin: int,
        qmax: int,
    ) -> torch.Tensor:  # type: ignore[override]
        q = torch.round(value / scale).add_(zero_point)
        inside = _clip(q, qmin, qmax)
        ctx.clipped = inside is not None
        if inside is not None:
            ctx.save_for_backward(inside)
        return q.sub_(zero_point).mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        return _masked_grad(ctx, grad), None, None, None, None


def fake_quantize_learnable(
    value: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    params: QuantParams,
    grad_factor: float,
) -> torch.Tensor:
    """Fake quantization with gradients for ``scale`` and ``zero_point`` (LSQ / LSQ+)."""
    if torch.onnx.is_in_onnx_export():
        return _export_qdq(value, params)
    if params.axis is None or scale.numel() == 1:
        return torch._fake_quantize_learnable_per_tensor_affine(
            value, scale.reshape(1), zero_point.reshape(1), params.qmin, params.qmax, grad_factor
        )
    return torch._fake_quantize_learnable_per_channel_affine(
        value, scale, zero_point, params.axis % value.dim(), params.qmin, params.qmax, grad_factor
    )


def onnx_storage(params: QuantParams) -> torch.dtype:
    """ONNX QuantizeLinear stores signed ranges as int8 and unsigned ones as uint8."""
    return torch.int8 if params.signed else torch.uint8


# The tracer passes only tensors and plain numbers to a Function's symbolic; the parameters of
# each traced call are looked up by an integer key instead.
_PENDING: dict[int, QuantParams] = {}


def _export_qdq(value: torch.Tensor, params: QuantParams) -> torch.Tensor:
    key = len(_PENDING)
    _PENDING[key] = params
    return _OnnxQDQ.apply(value, key)


class _OnnxQDQ(torch.autograd.Function):
    """Fake quantization in eager mode; a QuantizeLinear/DequantizeLinear pair in the graph."""

    @staticmethod
    def forward(ctx: Any, value: torch.Tensor, key: int) -> torch.Tensor:  # type: ignore[override]
        # Only the graph matters while tracing; touching the module's scale buffers here
        # would make the tracer record them inside the Function.
        return value.clone()

    @staticmethod
    def symbolic(g: Any, value: Any, key: int) -> Any:
        params = _PENDING[key]
        storage = onnx_storage(params)
        scale = params.scale.detach().to(torch.float32).cpu()
        if params.axis is None:
            scale = scale.reshape(())
        zero_point = params.zero_point.detach().round().to(storage).cpu().reshape(scale.shape)
        axis = params.axis
        if axis is not None and scale.dim() == 0:
            axis = None
        kwargs = {} if axis is None else {"axis_i": axis}
        container = (-128, 127) if params.signed else (0, 255)
        if (params.qmin, params.qmax) != container and (params.qmin, params.qmax) != (-127, 127):
            # Narrower than the int8/uint8 container: clip in float first so the integer
            # values stay in [qmin, qmax] (ONNX has no sub-byte Q/DQ in opset 17).
            lo = (params.qmin - params.zero_point.detach().cpu()) * params.scale.detach().cpu()
            hi = (params.qmax - params.zero_point.detach().cpu()) * params.scale.detach().cpu()
            if axis is not None:
                shape = [1] * _rank(value)
                shape[axis] = -1
                lo, hi = lo.reshape(shape), hi.reshape(shape)
            value = g.op("Max", value, g.op("Constant", value_t=lo.to(torch.float32)))
            value = g.op("Min", value, g.op("Constant", value_t=hi.to(torch.float32)))
        scale_c = g.op("Constant", value_t=scale)
        zero_c = g.op("Constant", value_t=zero_point)
        q = g.op("QuantizeLinear", value, scale_c, zero_c, **kwargs)
        return g.op("DequantizeLinear", q, scale_c, zero_c, **kwargs)


def _rank(value: Any) -> int:
    rank = value.type().dim()
    if rank is None:
        raise ValueError("per-channel quantization of a tensor of unknown rank cannot be exported")
    return rank


def fake_quantize_eager(value: torch.Tensor, params: QuantParams) -> torch.Tensor:
    scale, zero_point = params.broadcast(value)
    q = (torch.round(value / scale) + zero_point).clamp(params.qmin, params.qmax)
    return (q - zero_point) * scale
