"""Quantized artefacts: ONNX QDQ models that run in integers, and compact int8 checkpoints.

:func:`export_onnx` traces the wrapped (simulating) model with the TorchScript ONNX exporter.
While tracing, every quantization handler's :func:`~compress_core.quantization.fake_quantize`
emits a ``QuantizeLinear -> DequantizeLinear`` pair carrying the handler's scale and zero
point, so the exporter needs no knowledge of any quantization method. The graph is then
post-processed with the ``onnx`` package:

* a QuantizeLinear whose input is a constant (a weight) is evaluated: the weight is stored as
  an int8 (or uint8) initializer feeding DequantizeLinear, and the float weight is dropped;
* the float bias of a Conv/Gemm whose input and weight are both dequantized becomes an int32
  initializer with scale ``input_scale * weight_scale`` (zero point 0), which lets
  onnxruntime fuse the node into an integer kernel (QLinearConv, QGemm, ...).

:func:`save_quantized` / :func:`load_quantized` write and read a safetensors checkpoint that
stores quantized parameters as integers next to their scales and zero points.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CompressError
from .quantization import _PENDING, QuantizedTarget, QuantParams, dequantize, onnx_storage, quantize
from .wrapper import wrappers

__all__ = ["ExportError", "export_onnx", "load_quantized", "quantized_targets", "save_quantized"]

OPSET = 17


class ExportError(CompressError):
    """A compressed model that cannot be written in the requested format."""


def quantized_targets(model: nn.Module) -> Iterator[tuple[str, str, nn.Module, QuantizedTarget]]:
    """``(module_name, target_name, module, handler)`` of every quantized target on ``model``."""
    for name, module, wrapper in wrappers(model):
        for target, chain in wrapper.handlers.items():
            handler = chain.get("quantization")
            if handler is not None and isinstance(handler, QuantizedTarget):
                yield name, target, module, handler


def _check_exportable(model: nn.Module) -> None:
    for name, target, module, handler in quantized_targets(model):
        params = handler.quant_params(module)
        if params.block is not None:
            raise ExportError(
                f"{name}.{target}: block granularity {list(params.block)} has no ONNX "
                "QuantizeLinear form (one scale per tensor or per axis); use per-tensor or per_channel"
            )
        if params.qmax - params.qmin > 255:
            raise ExportError(
                f"{name}.{target}: range [{params.qmin}, {params.qmax}] does not fit in 8 bits"
            )


def export_onnx(
    model: nn.Module,
    example_inputs: tuple[Any, ...],
    path: str | os.PathLike[str],
    *,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
) -> Path:
    """Export ``model`` (wrapped by quantizers, or not) to ONNX with QDQ nodes at ``path``.

    The model is traced in eval mode (restored afterwards). Quantized weights are stored as
    int8/uint8 initializers, biases of quantized Conv/Gemm as int32. Bit widths below 8 are
    stored in the 8-bit container with the same scale and zero point, and activations are
    clipped to the narrower range before QuantizeLinear, so the values stay within
    ``[qmin, qmax]``.

    :param example_inputs: a tuple of positional arguments, as in ``torch.export``.
    :raises ExportError: for quantization that ONNX QDQ cannot express (block granularity).
    :return: the path written.
    """
    import onnx

    if not isinstance(example_inputs, tuple):
        raise TypeError("example_inputs must be a tuple of positional arguments")
    _check_exportable(model)
    path = Path(path)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    buffer = io.BytesIO()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(
                model,
                example_inputs,
                buffer,
                dynamo=False,
                opset_version=OPSET,
                do_constant_folding=True,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
            )
    finally:
        _PENDING.clear()
        for module, training in modes.items():
            module.train(training)
    proto = onnx.load_from_string(buffer.getvalue())
    _fold_clips(proto)
    _fold_weights(proto)
    _quantize_biases(proto)
    _drop_unused(proto)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


# -- graph post-processing ------------------------------------------------------------------


def _constants(proto: Any) -> dict[str, Any]:
    from onnx import numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attribute.t)
    return values


def _axis(node: Any) -> int:
    for attribute in node.attribute:
        if attribute.name == "axis":
            return int(attribute.i)
    return 1


def _fold_clips(proto: Any) -> None:
    """Evaluate Max/Min of constants (the clip that sub-8-bit ranges put before a weight's Q)."""
    import numpy as np
    from onnx import numpy_helper

    constants = _constants(proto)
    kept = []
    for node in proto.graph.node:
        if node.op_type in ("Max", "Min") and all(name in constants for name in node.input):
            fn = np.maximum if node.op_type == "Max" else np.minimum
            value = constants[node.input[0]]
            for name in node.input[1:]:
                value = fn(value, constants[name])
            constants[node.output[0]] = value
            proto.graph.initializer.append(
                numpy_helper.from_array(np.asarray(value), node.output[0])
            )
            continue
        kept.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(kept)


def _fold_weights(proto: Any) -> None:
    """Replace ``QuantizeLinear(constant)`` by the integer initializer it computes."""
    import numpy as np
    from onnx import numpy_helper

    constants = _constants(proto)
    kept = []
    for node in proto.graph.node:
        if (
            node.op_type == "QuantizeLinear"
            and node.input[0] in constants
            and node.input[1] in constants
        ):
            value = constants[node.input[0]].astype(np.float64)
            scale = constants[node.input[1]].astype(np.float64)
            zero = constants[node.input[2]] if len(node.input) > 2 else np.zeros((), np.uint8)
            if scale.ndim == 1 and scale.size > 1:
                shape = [1] * value.ndim
                shape[_axis(node) % value.ndim] = -1
                scale = scale.reshape(shape)
                zero_b = zero.astype(np.float64).reshape(shape)
            else:
                zero_b = zero.astype(np.float64)
            info = np.iinfo(zero.dtype)
            # np.rint rounds half to even, as QuantizeLinear does.
            q = np.clip(np.rint(value / scale) + zero_b, info.min, info.max).astype(zero.dtype)
            proto.graph.initializer.append(numpy_helper.from_array(q, node.output[0]))
            continue
        kept.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(kept)


def _quantize_biases(proto: Any) -> None:
    """Float bias of Conv/Gemm fed by two DequantizeLinear -> int32 initializer + DequantizeLinear."""
    import numpy as np
    from onnx import helper, numpy_helper

    constants = _constants(proto)
    producer = {out: node for node in proto.graph.node for out in node.output}
    initializers = {init.name: init for init in proto.graph.initializer}
    new_nodes = []
    for node in proto.graph.node:
        if (
            node.op_type not in ("Conv", "Gemm")
            or len(node.input) < 3
            or node.input[2] not in initializers
        ):
            continue
        if node.op_type == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute):
            continue
        x_dq, w_dq = producer.get(node.input[0]), producer.get(node.input[1])
        if (
            x_dq is None
            or w_dq is None
            or x_dq.op_type != "DequantizeLinear"
            or w_dq.op_type != "DequantizeLinear"
        ):
            continue
        if x_dq.input[1] not in constants or w_dq.input[1] not in constants:
            continue
        x_scale = constants[x_dq.input[1]].astype(np.float64)
        w_scale = constants[w_dq.input[1]].astype(np.float64).reshape(-1)
        if x_scale.size != 1:
            continue
        bias = numpy_helper.to_array(initializers[node.input[2]]).astype(np.float64)
        scale = (x_scale.reshape(()) * w_scale).astype(np.float32)
        if scale.size == 1:
            scale = np.full(bias.shape, scale.reshape(()), np.float32)
        q = np.clip(np.rint(bias / scale.astype(np.float64)), -(2**31), 2**31 - 1).astype(np.int32)
        name = node.input[2]
        proto.graph.initializer.append(numpy_helper.from_array(q, f"{name}_quantized"))
        proto.graph.initializer.append(numpy_helper.from_array(scale, f"{name}_scale"))
        proto.graph.initializer.append(
            numpy_helper.from_array(np.zeros(bias.shape, np.int32), f"{name}_zero_point")
        )
        new_nodes.append(
            helper.make_node(
                "DequantizeLinear",
                [f"{name}_quantized", f"{name}_scale", f"{name}_zero_point"],
                [f"{name}_dequantized"],
                axis=0,
                name=f"{name}_DequantizeLinear",
            )
        )
        node.input[2] = f"{name}_dequantized"
    if new_nodes:
        nodes = list(new_nodes) + list(proto.graph.node)
        del proto.graph.node[:]
        proto.graph.node.extend(nodes)


def _drop_unused(proto: Any) -> None:
    used = {name for node in proto.graph.node for name in node.input}
    used |= {out.name for out in proto.graph.output}
    kept = [init for init in proto.graph.initializer if init.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    inputs = [
        i for i in proto.graph.input if i.name in used or i.name not in {init.name for init in kept}
    ]
    del proto.graph.input[:]
    proto.graph.input.extend(inputs)


# -- compact checkpoint ---------------------------------------------------------------------

_METADATA_KEY = "compress_core.quantized"


def save_quantized(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write ``model``'s state_dict to a safetensors file with quantized parameters as integers.

    A quantized parameter target is stored as int8 (uint8 for unsigned ranges) computed with
    its frozen scale and zero point, which are in the state_dict next to it; every other entry
    is stored as it is. Load with :func:`load_quantized` into the same wrapped model.
    """
    from safetensors.torch import save_file

    state = {k: v.detach() for k, v in model.state_dict().items()}
    quantized: dict[str, str] = {}
    # Observer ranges are not needed to reproduce the model (scale and zero point are), and
    # zero points are integers: both would otherwise cost a few percent of the file.
    skipped = [k for k in state if k.endswith(("__quantization_min", "__quantization_max"))]
    for key in skipped:
        del state[key]
    zero_points: dict[str, str] = {}
    for module_name, target, module, handler in quantized_targets(model):
        value = getattr(module, target, None)
        if not isinstance(value, torch.Tensor) or (
            target not in module._parameters and target not in module._buffers
        ):
            continue
        params = handler.quant_params(module)
        if params.qmax - params.qmin > 255:
            continue
        key = f"{module_name}.{target}" if module_name else target
        zp_key = (f"{module_name}." if module_name else "") + f"{target}__quantization_zero_point"
        if zp_key in state and not state[zp_key].requires_grad:
            zero_points[zp_key] = str(state[zp_key].dtype).removeprefix("torch.")
            state[zp_key] = state[zp_key].round().to(onnx_storage(params))
        q = quantize(handler.export_value(module, value.detach()), params)
        state[key] = q.to(onnx_storage(params))
        quantized[key] = str(onnx_storage(params)).removeprefix("torch.")
    state = {k: v.contiguous().cpu() for k, v in state.items()}
    # Tensors that share storage (tied weights) must be separate in safetensors.
    seen: set[int] = set()
    for key, value in state.items():
        pointer = value.untyped_storage().data_ptr()
        if pointer in seen:
            state[key] = value.clone()
        seen.add(pointer)
    metadata = {
        _METADATA_KEY: json.dumps(quantized),
        _METADATA_KEY + ".zero_points": json.dumps(zero_points),
    }
    save_file(state, str(path), metadata=metadata)
    return Path(path)


def load_quantized(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load a checkpoint written by :func:`save_quantized` into the same wrapped model."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if _METADATA_KEY not in metadata:
        raise ExportError(f"{path} was not written by save_quantized")
    quantized = json.loads(metadata[_METADATA_KEY])
    zero_points = json.loads(metadata.get(_METADATA_KEY + ".zero_points", "{}"))
    state = load_file(str(path))
    integers = {key: state.pop(key) for key in quantized}
    for key, dtype in zero_points.items():
        state[key] = state[key].to(getattr(torch, dtype))
    current = model.state_dict()
    for key in current:
        if key in integers or (
            key not in state and key.endswith(("__quantization_min", "__quantization_max"))
        ):
            state[key] = current[key]  # placeholders: weights are replaced below
    model.load_state_dict(state)
    targets = {
        (f"{module_name}.{target}" if module_name else target): (module, target, handler)
        for module_name, target, module, handler in quantized_targets(model)
    }
    with torch.no_grad():
        for key, q in integers.items():
            if key not in targets:
                raise ExportError(f"{key} is quantized in {path} but not in the model")
            module, target, handler = targets[key]
            params: QuantParams = handler.quant_params(module)
            value = handler.import_value(module, dequantize(q.to(torch.int64), params))
            getattr(module, target).copy_(value)
    return model
