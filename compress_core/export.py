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
  onnxruntime fuse the node into an integer kernel (QLinearConv, QGemm, ...);
* a Linear on a 3-D+ input (``MatMul``) whose input is quantized becomes QuantizeLinear ->
  MatMulInteger (weight stored ``[in, out]``) -> Cast -> Mul(scales) -> Add(bias), which
  onnxruntime fuses into its MatMulIntegerToFloat kernel, instead of a float matmul on
  dequantized values (issue #7);
* a quantized embedding table is looked up as int8 rows that are dequantized after the
  Gather (per-row scales gathered alongside), rather than dequantized whole on every call.

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
    ``[qmin, qmax]``. A Linear on a 3-D+ input whose input is quantized per tensor becomes an
    integer matmul (MatMulInteger, fused by onnxruntime into MatMulIntegerToFloat), and a
    quantized embedding table is gathered as int8 rows (see docs/quantization.md).

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
                buffer,  # type: ignore[arg-type]  # the TorchScript exporter writes to files too
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
    _integer_matmuls(proto)
    # The Transposes _integer_matmuls bypassed would still read a (tied) table's DQ.
    _drop_dead_nodes(proto)
    _quantized_gathers(proto)
    _drop_dead_nodes(proto)
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


def _axis(node: Any, default: int = 1) -> int:
    """A node's ``axis`` attribute; ONNX's default for it differs by op (1 for Q/DQ)."""
    for attribute in node.attribute:
        if attribute.name == "axis":
            return int(attribute.i)
    return default


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
    producer = _producers(proto)
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


def _producers(proto: Any) -> dict[str, Any]:
    return {out: node for node in proto.graph.node for out in node.output}


def _consumers(proto: Any) -> dict[str, list[Any]]:
    consumers: dict[str, list[Any]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def _integer_weight(name: str, constants: dict[str, Any], producer: dict[str, Any]) -> Any:
    """The DequantizeLinear of a constant 2-D integer weight that produces ``name``, if any."""
    import numpy as np

    node = producer.get(name)
    if node is None or node.op_type != "DequantizeLinear" or node.input[0] not in constants:
        return None
    value = constants[node.input[0]]
    if value.ndim != 2 or value.dtype not in (np.int8, np.uint8):
        return None
    if any(i not in constants for i in node.input[1:]):
        return None
    return node


def _integer_matmuls(proto: Any) -> None:
    """Rewrite quantized ``Linear``s on 3-D+ inputs into integer matmuls with float output.

    The exporter writes such a Linear as ``MatMul(DQ(Q(x)), Transpose(DQ(Wq))) -> Add(b)``,
    which onnxruntime runs as a float Gemm on dequantized values (issue #7: all-MiniLM-L6-v2
    at 1.16x the float32 latency). When the input is quantized per tensor it becomes::

        QuantizeLinear(x, s_x, z_x) -> MatMulInteger(xq, Wq^T, z_x, z_w) -> Cast(float)
            -> Mul(s_x * s_w) -> Add(b)

    the simulation's arithmetic exactly: integer products accumulated in int32, times the
    product of the scales (one per output column). Details, all measured with onnxruntime
    1.32 (docs/quantization.md):

    * ``Wq^T`` is the int8 weight stored as ``[in, out]``, so nothing is transposed per call;
    * an int8 activation is quantized to uint8 with zero point ``z_x + 128`` (the same real
      values): onnxruntime's x86 MatMulInteger has fast kernels for uint8 x int8 only;
    * ``s_x`` reaches the scale ``Mul`` through ``DequantizeLinear(1, s_x)``, a node that
      onnxruntime's constant folding leaves alone (it keeps QDQ nodes), so that the product
      of the scales stays a ``Mul`` node: only then does onnxruntime fuse the chain, bias
      included, into one MatMulIntegerToFloat kernel. Folded to a constant, the Cast, Mul
      and Add would each make a pass over the output.

    A Linear whose input is not quantized per tensor is left as exported (a float MatMul
    on the dequantized, transposed int8 weight).
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    constants = _constants(proto)
    producer = _producers(proto)
    replaced: dict[int, list[Any]] = {}

    def initializer(value: Any, name: str) -> str:
        if name not in constants:
            proto.graph.initializer.append(numpy_helper.from_array(value, name))
            constants[name] = value
        return name

    for node in proto.graph.node:
        if node.op_type != "MatMul":
            continue
        transpose = producer.get(node.input[1])
        if transpose is None or transpose.op_type != "Transpose":
            continue
        perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), [1, 0])
        weight = _integer_weight(transpose.input[0], constants, producer)
        if weight is None or perm != [1, 0]:
            continue
        w_value = constants[weight.input[0]]
        w_scale = constants[weight.input[1]].astype(np.float32)
        w_zero = (
            constants[weight.input[2]]
            if len(weight.input) > 2
            else np.zeros(w_scale.shape, w_value.dtype)
        )
        per_column = w_scale.size > 1
        if per_column and _axis(weight) % 2 != 0:
            continue  # one scale per input channel cannot be applied after the matmul
        activation = producer.get(node.input[0])
        quantize = None
        if activation is not None and activation.op_type == "DequantizeLinear":
            quantize = producer.get(activation.input[0])
        if (
            activation is None
            or quantize is None
            or quantize.op_type != "QuantizeLinear"
            or len(activation.input) < 3
            or any(name not in constants for name in activation.input[1:])
            or constants[activation.input[1]].size != 1
        ):
            # Weight-only: a float matmul on the dequantized weight, as exported (onnxruntime
            # may still run it as MatMulNBits; see docs/quantization.md).
            continue
        base = weight.input[0]
        w_t = initializer(np.ascontiguousarray(w_value.T), f"{base}_transposed")
        w_s = initializer(w_scale, f"{base}_transposed_scale")
        w_z = initializer(w_zero, f"{base}_transposed_zero_point")
        x_scale = constants[activation.input[1]].astype(np.float32).reshape(())
        x_zero = constants[activation.input[2]].reshape(())
        if x_zero.dtype == np.int8:
            x_zero = np.asarray(int(x_zero) + 128, np.uint8)
        out = node.output[0]
        x_s = initializer(x_scale, f"{out}_input_scale")
        x_z = initializer(x_zero, f"{out}_input_zero_point")
        one = initializer(np.asarray(1, np.int32), "compress_core_one_int32")
        replaced[id(node)] = [
            helper.make_node("QuantizeLinear", [quantize.input[0], x_s, x_z], [f"{out}_xq"]),
            helper.make_node(
                "MatMulInteger", [f"{out}_xq", w_t, x_z, w_z], [f"{out}_int32"], name=node.name
            ),
            helper.make_node("Cast", [f"{out}_int32"], [f"{out}_float"], to=TensorProto.FLOAT),
            helper.make_node("DequantizeLinear", [one, x_s], [f"{out}_runtime_input_scale"]),
            helper.make_node("Mul", [f"{out}_runtime_input_scale", w_s], [f"{out}_scale"]),
            helper.make_node("Mul", [f"{out}_float", f"{out}_scale"], [out]),
        ]
    if not replaced:
        return
    nodes = []
    for node in proto.graph.node:
        nodes.extend(replaced.get(id(node), [node]))
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)


def _quantized_gathers(proto: Any) -> None:
    """Gather the integer rows of a quantized embedding table, then dequantize only those.

    Per-row (``per_channel``: dim 0 of the weight, one scale per token) quantization has no
    DequantizeLinear form after the Gather (the rows' scales differ per looked-up id), and
    dequantizing the whole table before it would cost a pass over the table per call. So
    ``Gather(DQ(Wq), ids)`` becomes ``(Cast(Gather(Wq, ids)) - Gather(z, ids)) *
    Gather(s, ids)`` with ``s``/``z`` stored as ``[rows, 1]`` (the Sub is left out for zero
    zero points), and a per-tensor table ``DQ(Gather(Wq, ids))``. Values equal the
    simulation's: dequantizing and gathering commute.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    constants = _constants(proto)
    producer = _producers(proto)
    consumers = _consumers(proto)
    replaced: dict[int, list[Any]] = {}
    for node in proto.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        weight = _integer_weight(node.output[0], constants, producer)
        users = consumers.get(node.output[0], [])
        if weight is None or not users:
            continue
        if any(
            u.op_type != "Gather" or u.input[0] != node.output[0] or _axis(u, 0) != 0
            for u in users
        ):
            continue
        scale = constants[node.input[1]].astype(np.float32)
        zero = constants[node.input[2]] if len(node.input) > 2 else np.zeros((), np.int8)
        per_row = scale.size > 1 and _axis(node) % 2 == 0
        table = node.input[0]
        for user in users:
            base, ids = user.output[0], user.input[1]
            nodes = [helper.make_node("Gather", [table, ids], [f"{base}_integers"], axis=0)]
            if not per_row:
                # One scale per tensor or per column: DequantizeLinear after the Gather.
                per_column: dict[str, Any] = {"axis": -1} if scale.size > 1 else {}
                nodes.append(
                    helper.make_node(
                        "DequantizeLinear",
                        [f"{base}_integers", *node.input[1:]],
                        [base],
                        **per_column,
                    )
                )
                replaced[id(user)] = nodes
                continue
            nodes.append(
                helper.make_node(
                    "Cast", [f"{base}_integers"], [f"{base}_cast"], to=TensorProto.FLOAT
                )
            )
            current = f"{base}_cast"
            if np.any(zero != 0):
                zp_name = f"{table}_row_zero_points"
                if zp_name not in constants:
                    rows = zero.astype(np.float32).reshape(-1, 1)
                    proto.graph.initializer.append(numpy_helper.from_array(rows, zp_name))
                    constants[zp_name] = rows
                nodes.append(
                    helper.make_node("Gather", [zp_name, ids], [f"{base}_zero_points"], axis=0)
                )
                nodes.append(
                    helper.make_node("Sub", [current, f"{base}_zero_points"], [f"{base}_centred"])
                )
                current = f"{base}_centred"
            scale_name = f"{table}_row_scales"
            if scale_name not in constants:
                proto.graph.initializer.append(
                    numpy_helper.from_array(scale.reshape(-1, 1), scale_name)
                )
                constants[scale_name] = scale
            nodes.append(helper.make_node("Gather", [scale_name, ids], [f"{base}_scales"], axis=0))
            nodes.append(helper.make_node("Mul", [current, f"{base}_scales"], [base]))
            replaced[id(user)] = nodes
    if not replaced:
        return
    nodes = []
    for node in proto.graph.node:
        nodes.extend(replaced.get(id(node), [node]))
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)


def _drop_dead_nodes(proto: Any) -> None:
    """Remove nodes whose outputs nothing reads (left behind by the rewrites above)."""
    while True:
        used = {name for node in proto.graph.node for name in node.input}
        used |= {out.name for out in proto.graph.output}
        kept = [node for node in proto.graph.node if any(out in used for out in node.output)]
        if len(kept) == len(proto.graph.node):
            return
        del proto.graph.node[:]
        proto.graph.node.extend(kept)


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
