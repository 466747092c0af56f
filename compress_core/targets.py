"""Compression targets: parameters, buffers, module inputs and module outputs.

Target names follow the spec: an attribute name (``weight``), ``_input_`` / ``_input_N`` /
``_input_<argname>`` and ``_output_`` / ``_output_N`` / ``_output_<key>``. Inputs resolve
against ``inspect.signature(module.forward)`` (``self`` not counted), so ``_input_0`` and
``_input_x`` name the same argument and are one target; its canonical name is the positional
form where the argument can be passed positionally.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, MutableMapping
from typing import Any, Callable, Literal, cast

import attrs
import torch
import torch.nn as nn

__all__ = ["TargetRef", "get_input", "map_output", "resolve_target", "set_input"]

INPUT_PREFIX = "_input_"
OUTPUT_PREFIX = "_output_"

TargetKind = Literal["parameter", "buffer", "input", "output"]


@attrs.frozen
class TargetRef:
    """A resolved target of one module."""

    name: str
    """Canonical target name (``weight``, ``_input_0``, ``_input_mask``, ``_output_logits``)."""
    kind: TargetKind
    index: int | None = None
    """Positional index of an input, or of an output element."""
    key: str | None = None
    """Argument name of an input, or dict key of an output."""

    @property
    def is_tensor_attribute(self) -> bool:
        return self.kind in ("parameter", "buffer")


def resolve_target(module: nn.Module, name: str) -> TargetRef:
    """Resolve ``name`` on ``module`` or raise ``ValueError`` saying what exists."""
    if name.startswith(INPUT_PREFIX):
        return _resolve_input(module, name[len(INPUT_PREFIX):])
    if name.startswith(OUTPUT_PREFIX):
        rest = name[len(OUTPUT_PREFIX):]
        if rest == "":
            return TargetRef(name=name, kind="output")
        if rest.isdigit():
            if int(rest) == 0:
                # _output_ already means "the tensor, or its first element": one target.
                return TargetRef(name=OUTPUT_PREFIX, kind="output")
            return TargetRef(name=name, kind="output", index=int(rest))
        return TargetRef(name=name, kind="output", key=rest)
    if module._parameters.get(name) is not None:
        return TargetRef(name=name, kind="parameter")
    if module._buffers.get(name) is not None:
        return TargetRef(name=name, kind="buffer")
    tensors = [n for n, v in module._parameters.items() if v is not None]
    tensors += [n for n, v in module._buffers.items() if v is not None]
    hint = "." if "." not in name else "; select the submodule that holds it instead."
    if name in module._parameters or name in module._buffers:
        raise ValueError(f"'{name}' is None on {type(module).__name__}{hint}")
    raise ValueError(
        f"{type(module).__name__} has no target '{name}' (parameters and buffers: "
        f"{', '.join(tensors) or 'none'}; or use _input_*/_output_*){hint}"
    )


def _forward_parameters(module: nn.Module) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        # Builtin or C-implemented forwards have no signature: accept positional indices only.
        return [inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL)]


def _resolve_input(module: nn.Module, rest: str) -> TargetRef:
    params = _forward_parameters(module)
    positional = [
        p for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    var_positional = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)
    var_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    described = ", ".join(p.name for p in params) or "no arguments"
    if rest == "" or rest.isdigit():
        index = int(rest or 0)
        if index < len(positional):
            param = positional[index]
            key = None if param.kind is inspect.Parameter.POSITIONAL_ONLY else param.name
            return TargetRef(name=f"{INPUT_PREFIX}{index}", kind="input", index=index, key=key)
        if var_positional:
            return TargetRef(name=f"{INPUT_PREFIX}{index}", kind="input", index=index)
        raise ValueError(
            f"{type(module).__name__}.forward takes {len(positional)} positional argument(s) "
            f"({described}); there is no input {index}"
        )
    for index, param in enumerate(positional):
        if param.name == rest and param.kind is not inspect.Parameter.POSITIONAL_ONLY:
            return TargetRef(name=f"{INPUT_PREFIX}{index}", kind="input", index=index, key=rest)
    if any(p.name == rest and p.kind is inspect.Parameter.KEYWORD_ONLY for p in params) or var_keyword:
        return TargetRef(name=f"{INPUT_PREFIX}{rest}", kind="input", key=rest)
    raise ValueError(f"{type(module).__name__}.forward has no argument '{rest}' (arguments: {described})")


def get_input(ref: TargetRef, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    """The value passed for input ``ref`` in this call, or ``None`` when it was not passed."""
    if ref.index is not None and ref.index < len(args):
        return args[ref.index]
    if ref.key is not None:
        return kwargs.get(ref.key)
    return None


def set_input(
    ref: TargetRef, args: tuple[Any, ...], kwargs: dict[str, Any], value: Any
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if ref.index is not None and ref.index < len(args):
        args = args[: ref.index] + (value,) + args[ref.index + 1:]
    elif ref.key is not None and ref.key in kwargs:
        kwargs = {**kwargs, ref.key: value}
    return args, kwargs


def map_output(ref: TargetRef, output: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to the output element ``ref`` names, returning the (new) output.

    ``_output_`` is the output itself when it is a tensor, otherwise its first element (the
    first value of a dict such as a Hugging Face ``ModelOutput``).
    """
    if isinstance(output, torch.Tensor):
        return fn(output) if ref.index in (None, 0) and ref.key is None else output
    if isinstance(output, Mapping):
        keys = list(output.keys())
        if ref.key is not None:
            key = ref.key
        else:
            index = ref.index or 0
            if index >= len(keys):
                return output
            key = keys[index]
        if key not in output or not isinstance(output[key], torch.Tensor):
            return output
        # ModelOutput keeps attributes and items in sync through __setitem__.
        cast(MutableMapping, output)[key] = fn(output[key])
        return output
    if isinstance(output, (tuple, list)):
        index = ref.index or 0
        if ref.key is not None or index >= len(output) or not isinstance(output[index], torch.Tensor):
            return output
        items = list(output)
        items[index] = fn(items[index])
        if isinstance(output, list):
            return items
        return type(output)(*items) if hasattr(output, "_fields") else tuple(items)
    return output


def get_output(ref: TargetRef, output: Any) -> torch.Tensor | None:
    """The tensor ``ref`` names in ``output``, or ``None``."""
    found: list[torch.Tensor] = []

    def grab(t: torch.Tensor) -> torch.Tensor:
        found.append(t)
        return t

    map_output(ref, output, grab)
    return found[0] if found else None
