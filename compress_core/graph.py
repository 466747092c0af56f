"""The model's dataflow graph, mapped back to the user's module tree.

:func:`capture` runs ``torch.export.export`` (non-strict, so Python control flow that depends
only on shapes and Python values is fine, and Hugging Face models trace) and falls back to
``torch.fx.symbolic_trace`` when export fails. Both give an fx graph; :class:`ModuleGraph`
turns it into a small, framework-neutral description that analyses walk:

- one :class:`OpNode` per graph node, in topological order, with a normalised operator name
  (``"linear"``, ``"conv2d"``, ``"add"``, ``"view"``, ...), its tensor inputs and users, its
  arguments with nodes replaced by node names, and the output shape(s);
- which module owns each node (the innermost entry of ``nn_module_stack``), which parameter or
  buffer a placeholder is (its fully-qualified name), and which module's weight an op consumes
  (``linear``/``conv``/``embedding``/norm ops use the weight of a module; the op is attributed to
  that module).

Dependency detection (:mod:`compress_core.dependency`) uses it to couple output channels; a
speedup pass can reuse it to propagate channel masks forward and backward.

The model is left unchanged: training flags are restored after capture, no hooks remain, and
non-strict export runs on fake tensors, so parameters and buffers keep their identity and
values.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import attrs
import torch
import torch.fx as fx
import torch.nn as nn

from .errors import CompressError

__all__ = ["ModuleGraph", "OpNode", "capture", "capture_and_analyse"]

Shape = tuple[int, ...]
T = TypeVar("T")


@attrs.frozen
class NodeRef:
    """A reference to another node inside :attr:`OpNode.args` / :attr:`OpNode.kwargs`."""

    name: str


@attrs.frozen(kw_only=True)
class OpNode:
    """One node of a :class:`ModuleGraph`."""

    name: str
    """Unique node name (the fx node's name)."""
    kind: str
    """``"input"`` (a user input), ``"parameter"``, ``"buffer"``, ``"constant"``, ``"call"`` or
    ``"output"``."""
    op: str
    """Normalised operator name for calls: the ATen name without overload and without the
    in-place ``_`` suffix (``"conv2d"``, ``"add"``, ``"hardtanh"``), ``"getitem"`` for tuple
    indexing, or the lower-cased module class name for modules that the fallback tracer keeps as
    leaves (``"linear"``, ``"batchnorm2d"``); empty for non-calls."""
    target: Any = attrs.field(eq=False, repr=False)
    """The fx target (an ``OpOverload``, a function, a method name or a module path)."""
    args: tuple[Any, ...] = attrs.field(repr=False)
    """Positional arguments, graph nodes replaced by :class:`NodeRef`."""
    kwargs: dict[str, Any] = attrs.field(repr=False)
    inputs: tuple[str, ...]
    """Names of the nodes this node reads, in argument order (duplicates removed)."""
    users: tuple[str, ...]
    """Names of the nodes that read this node."""
    module: str | None
    """Fully-qualified name of the innermost module whose forward produced this node
    (``""`` is the root model), ``None`` when unknown."""
    tensor_name: str | None
    """For parameter/buffer placeholders: the fully-qualified parameter or buffer name."""
    weight_of: str | None
    """Name of the module whose weight this op consumes (``linear``/``conv*``/``embedding``/
    norm ops), ``None`` otherwise."""
    shape: Shape | None
    """Output shape when the output is one tensor."""
    shapes: tuple[Shape | None, ...] | None
    """Per-element output shapes when the output is a tuple/list, else ``None``."""
    dtype: torch.dtype | None = attrs.field(repr=False)


@attrs.define
class ModuleGraph:
    """The captured graph of a model; nodes are in topological order.

    :ivar nodes: ``name -> OpNode``, topologically ordered.
    :ivar method: ``"export"`` or ``"symbolic_trace"``, whichever captured the graph.
    :ivar modules: ``name -> module`` of the captured model (the user's modules).
    """

    nodes: dict[str, OpNode]
    method: str
    modules: dict[str, nn.Module] = attrs.field(repr=False)

    def __iter__(self) -> Iterator[OpNode]:
        return iter(self.nodes.values())

    def __getitem__(self, name: str) -> OpNode:
        return self.nodes[name]

    def calls(self) -> Iterator[OpNode]:
        """The ``call`` nodes in topological order."""
        return (n for n in self.nodes.values() if n.kind == "call")

    def arg(self, node: OpNode, index: int, name: str | None = None, default: Any = None) -> Any:
        """Argument ``index`` (or keyword ``name``) of ``node``, resolving nothing."""
        if index < len(node.args):
            return node.args[index]
        if name is not None and name in node.kwargs:
            return node.kwargs[name]
        return default

    def input_node(self, node: OpNode, index: int, name: str | None = None) -> OpNode | None:
        """The node passed as argument ``index``/``name`` of ``node``, if it is a node."""
        value = self.arg(node, index, name)
        return self.nodes[value.name] if isinstance(value, NodeRef) else None

    def ops_of(self, module_name: str) -> list[OpNode]:
        """The call nodes that consume ``module_name``'s weight, in graph order."""
        return [n for n in self.calls() if n.weight_of == module_name]


CAPTURE_METHODS = ("export", "eager")
ANALYSIS_METHODS = ("auto", *CAPTURE_METHODS)
"""What analyses built on :func:`capture` accept: ``"auto"`` is :func:`capture_and_analyse`'s fallback."""


def capture_and_analyse(
    model: nn.Module,
    example_inputs: tuple[Any, ...],
    method: str,
    analyse: Callable[[ModuleGraph, bool], T | None],
) -> T:
    """Capture ``model``'s graph and run ``analyse(graph, last)`` on it.

    With ``method="export"`` or ``"eager"`` the graph comes from :func:`capture` with that
    method and ``analyse`` is called once with ``last=True``. With ``method="auto"`` the eager
    capture comes first (``last=False``); the graph is captured again with ``"export"`` (and
    analysed with ``last=True``) exactly when the eager run raises, or when ``analyse`` returns
    ``None`` to say that the eager graph has ops it cannot follow. With ``last=True``,
    ``analyse`` must return a result (or raise) rather than ``None``.

    :raises CompressError: for an unknown method, or when capture fails.
    """
    if method not in ANALYSIS_METHODS:
        raise CompressError(f"unknown capture method {method!r}; use one of {', '.join(ANALYSIS_METHODS)}")
    if method == "auto":
        try:
            eager = capture(model, example_inputs, method="eager")
        except CompressError:
            pass  # export may still follow what the recorded forward could not
        else:
            result = analyse(eager, False)
            if result is not None:
                return result
        method = "export"
    result = analyse(capture(model, example_inputs, method=method), True)
    if result is None:  # a broken analyse; never silently return nothing
        raise CompressError(f"analysis of the {method} graph gave no result")
    return result


def capture(model: nn.Module, example_inputs: tuple[Any, ...], *, method: str = "export") -> ModuleGraph:
    """Capture ``model``'s graph on ``example_inputs`` (a tuple of positional arguments).

    ``method="export"`` (the default) tries ``torch.export.export(strict=False)`` in eval
    mode, then ``torch.fx.symbolic_trace`` with shapes propagated by one eval-mode forward pass
    under ``no_grad``. ``method="eager"`` runs the model once in eval mode under ``no_grad``
    and records every torch function call (``torch.overrides.TorchFunctionMode``) with the
    module that made it: several times faster than export, follows any Python control flow
    (the path ``example_inputs`` take), but sees torch-level calls (``F.linear``,
    ``Tensor.view``, ``x[..., :4]`` as ``"index"``) rather than ATen ops.

    :raises CompressError: when capture fails (for ``export``: both tracers, with both reasons).
    """
    if not isinstance(example_inputs, tuple):
        raise CompressError(
            f"example_inputs must be a tuple of positional arguments (as for torch.export), "
            f"got {type(example_inputs).__name__}; wrap a single tensor as (x,)"
        )
    if method not in CAPTURE_METHODS:
        raise CompressError(f"unknown capture method {method!r}; use one of {', '.join(CAPTURE_METHODS)}")
    modules = dict(model.named_modules())
    training = {name: m.training for name, m in modules.items()}
    model.eval()  # dropout and batch-norm statistics must not change while capturing
    try:
        if method == "eager":
            try:
                return _EagerTracer(model, modules).trace(example_inputs)
            except CompressError:
                raise
            except Exception as error:  # the user's forward may raise anything
                raise CompressError(
                    f"cannot capture the model's graph: running it failed with "
                    f"{type(error).__name__}: {_first_line(error)}"
                ) from error
        try:
            exported = torch.export.export(model, example_inputs, strict=False)
        except Exception as export_error:  # export raises many unrelated types
            try:
                traced = fx.symbolic_trace(model)
                with torch.no_grad():
                    fx.passes.shape_prop.ShapeProp(traced).propagate(*example_inputs)
            except Exception as trace_error:  # so does tracing user code
                raise CompressError(
                    "cannot capture the model's graph: torch.export.export failed with "
                    f"{type(export_error).__name__}: {_first_line(export_error)}; "
                    f"torch.fx.symbolic_trace failed with {type(trace_error).__name__}: "
                    f"{_first_line(trace_error)}"
                ) from trace_error
            return _from_symbolic_trace(traced, modules)
        return _from_export(exported, modules)
    finally:
        for name, module in modules.items():
            module.training = training[name]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"


# -- building ---------------------------------------------------------------------------------

# Ops whose weight operand says which module they belong to, and where that operand sits.
_WEIGHT_ARG = {
    "linear": 1,
    "conv1d": 1,
    "conv2d": 1,
    "conv3d": 1,
    "convolution": 1,
    "conv_transpose1d": 1,
    "conv_transpose2d": 1,
    "conv_transpose3d": 1,
    "embedding": 0,
    "batch_norm": 1,
    "native_batch_norm": 1,
    "_native_batch_norm_legit_no_training": 1,
    "_native_batch_norm_legit_functional": 1,
    "_native_batch_norm_legit": 1,
    "layer_norm": 2,
    "native_layer_norm": 2,
    "group_norm": 2,
    "native_group_norm": 1,
    "rms_norm": 2,
}


def _shape_of(value: Any) -> Shape | None:
    if isinstance(value, torch.Tensor):
        try:
            return tuple(int(s) for s in value.shape)
        except TypeError:  # symbolic sizes; callers treat the shape as unknown
            return None
    return None


def _refs(value: Any) -> Any:
    if isinstance(value, fx.Node):
        return NodeRef(value.name)
    if isinstance(value, (list, tuple)):
        return type(value)(_refs(v) for v in value)
    if isinstance(value, dict):
        return {k: _refs(v) for k, v in value.items()}
    return value


def _owner(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    # export spells submodules of lists as "layer.0" but sometimes as "layer[0]" / "L['self']..."
    return _clean_path(path)


def _clean_path(path: str) -> str:
    path = path.replace("L['self']", "").replace("L__self__", "")
    out = []
    for part in path.replace("[", ".").replace("]", "").replace("'", "").split("."):
        if part:
            out.append(part)
    return ".".join(out)


def _op_name(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_function":
        target = node.target
        if target is operator.getitem:
            return "getitem"
        if isinstance(target, torch._ops.OpOverload):
            name = target._opname
        else:
            name = getattr(target, "__name__", str(target))
        return _strip_inplace(name)
    if node.op == "call_method":
        return _strip_inplace(str(node.target))
    if node.op == "call_module":
        cls = type(modules[str(node.target)])
        for base in cls.__mro__:
            if base in _MODULE_OPS:
                return _MODULE_OPS[base]
        return cls.__name__.lower()
    return ""


def _strip_inplace(name: str) -> str:
    # relu_ is relu for dataflow; dunder names (__add__) are not in-place ops.
    if name.startswith("__") and name.endswith("__"):
        name = name.strip("_")
    elif name.endswith("_"):
        name = name[:-1]
    return _ALIASES.get(name, name)


_ALIASES = {
    "iadd": "add", "isub": "sub", "imul": "mul", "itruediv": "div", "truediv": "div",
    "rtruediv": "div", "radd": "add", "rmul": "mul", "rsub": "rsub", "true_divide": "div",
    "T": "t", "concat": "cat", "concatenate": "cat",
}


# Leaf modules of the fallback tracer, named like the ATen op export would record.
_MODULE_OPS: dict[type, str] = {
    nn.Linear: "linear",
    nn.Conv1d: "conv1d",
    nn.Conv2d: "conv2d",
    nn.Conv3d: "conv3d",
    nn.ConvTranspose1d: "conv_transpose1d",
    nn.ConvTranspose2d: "conv_transpose2d",
    nn.ConvTranspose3d: "conv_transpose3d",
    nn.Embedding: "embedding",
    nn.modules.batchnorm._BatchNorm: "batch_norm",
    nn.LayerNorm: "layer_norm",
    nn.GroupNorm: "group_norm",
    nn.Dropout: "dropout",
    nn.Identity: "clone",
    nn.ReLU: "relu",
    nn.ReLU6: "hardtanh",
    nn.GELU: "gelu",
    nn.SiLU: "silu",
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
    nn.Hardswish: "hardswish",
    nn.Flatten: "flatten",
    nn.MaxPool2d: "max_pool2d",
    nn.AvgPool2d: "avg_pool2d",
    nn.AdaptiveAvgPool2d: "adaptive_avg_pool2d",
    nn.Softmax: "softmax",
}


def _build(
    graph: fx.Graph,
    modules: dict[str, nn.Module],
    method: str,
    placeholder_kind: dict[str, tuple[str, str | None]],
) -> ModuleGraph:
    param_owner: dict[str, str] = {}
    for node_name, (kind, tensor_name) in placeholder_kind.items():
        if kind == "parameter" and tensor_name is not None:
            param_owner[node_name] = tensor_name.rpartition(".")[0]
    nodes: dict[str, OpNode] = {}
    for node in graph.nodes:
        op = _op_name(node, modules)
        kind, tensor_name = "call", None
        if node.op == "placeholder":
            kind, tensor_name = placeholder_kind.get(node.name, ("input", None))
        elif node.op == "get_attr":
            kind, tensor_name = "constant", str(node.target)
        elif node.op == "output":
            kind = "output"
        weight_of = None
        module = _owner(node)
        if node.op == "call_module":
            module = str(node.target)
            if hasattr(modules[module], "weight"):
                weight_of = module
        elif op in _WEIGHT_ARG and kind == "call":
            index = _WEIGHT_ARG[op]
            weight = node.args[index] if index < len(node.args) else node.kwargs.get("weight")
            if isinstance(weight, fx.Node) and weight.name in param_owner:
                weight_of = param_owner[weight.name]
        if weight_of is not None:
            module = weight_of
        val = node.meta.get("val", node.meta.get("tensor_meta"))
        shape = shapes = dtype = None
        if isinstance(val, torch.Tensor):
            shape, dtype = _shape_of(val), val.dtype
        elif hasattr(val, "shape") and hasattr(val, "dtype"):  # fx TensorMetadata (ShapeProp)
            shape, dtype = tuple(int(s) for s in val.shape), val.dtype
        elif isinstance(val, (list, tuple)):
            shapes = tuple(_shape_of(v) if isinstance(v, torch.Tensor) else _meta_shape(v) for v in val)
        inputs = tuple(dict.fromkeys(n.name for n in node.all_input_nodes))
        nodes[node.name] = OpNode(
            name=node.name,
            kind=kind,
            op=op,
            target=node.target,
            args=_refs(tuple(node.args)),
            kwargs=_refs(dict(node.kwargs)),
            inputs=inputs,
            users=tuple(u.name for u in node.users),
            module=module,
            tensor_name=tensor_name,
            weight_of=weight_of,
            shape=shape,
            shapes=shapes,
            dtype=dtype,
        )
    return ModuleGraph(nodes=nodes, method=method, modules=modules)


def _meta_shape(value: Any) -> Shape | None:
    shape = getattr(value, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def _from_export(exported: torch.export.ExportedProgram, modules: dict[str, nn.Module]) -> ModuleGraph:
    signature = exported.graph_signature
    kinds: dict[str, tuple[str, str | None]] = {}
    for name, fqn in signature.inputs_to_parameters.items():
        kinds[name] = ("parameter", fqn)
    for name, fqn in signature.inputs_to_buffers.items():
        kinds[name] = ("buffer", fqn)
    for name, fqn in getattr(signature, "inputs_to_lifted_tensor_constants", {}).items():
        kinds[name] = ("constant", fqn)
    return _build(exported.graph, modules, "export", kinds)


def _from_symbolic_trace(traced: fx.GraphModule, modules: dict[str, nn.Module]) -> ModuleGraph:
    # symbolic_trace keeps leaf modules as call_module nodes; parameters used directly by the
    # root's forward appear as get_attr nodes.
    kinds: dict[str, tuple[str, str | None]] = {}
    params = dict(traced.named_parameters())
    graph = traced.graph
    for node in graph.nodes:
        if node.op == "get_attr" and str(node.target) in params:
            kinds[node.name] = ("parameter", str(node.target))
    built = _build(graph, modules, "symbolic_trace", kinds)
    for name, (kind, fqn) in kinds.items():
        node = built.nodes[name]
        built.nodes[name] = attrs.evolve(node, kind=kind, tensor_name=fqn)
    return built


class _EagerTracer:
    """Records torch function calls of one forward pass as :class:`OpNode` s."""

    def __init__(self, model: nn.Module, modules: dict[str, nn.Module]) -> None:
        self.model = model
        self.module_names = {id(m): name for name, m in modules.items()}
        self.modules = modules
        self.tensor_names: dict[int, tuple[str, str]] = {}
        for name, p in model.named_parameters():
            self.tensor_names[id(p)] = ("parameter", name)
        for name, b in model.named_buffers():
            self.tensor_names[id(b)] = ("buffer", name)
        self.nodes: dict[str, dict[str, Any]] = {}
        self.node_of: dict[int, str] = {}
        self.alive: list[Any] = []  # keeps recorded tensors alive so their ids stay unique
        self.stack: list[str] = []
        self.counts: dict[str, int] = {}

    def new_name(self, base: str) -> str:
        count = self.counts.get(base, 0)
        self.counts[base] = count + 1
        return base if count == 0 else f"{base}_{count}"

    def add(self, name: str, **fields: Any) -> str:
        self.nodes[name] = {"users": [], **fields}
        for source in fields.get("inputs", ()):
            self.nodes[source]["users"].append(name)
        return name

    def ref(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            key = id(value)
            if key not in self.node_of:
                kind, fqn = self.tensor_names.get(key, ("constant", None))
                name = self.new_name(("p_" if kind == "parameter" else "c_") + (fqn or "tensor").replace(".", "_"))
                self.add(name, kind=kind, op="", tensor_name=fqn, args=(), kwargs={}, inputs=(),
                         module=None, weight_of=None, shape=tuple(value.shape), shapes=None, dtype=value.dtype)
                self.node_of[key] = name
                self.alive.append(value)
            return NodeRef(self.node_of[key])
        if isinstance(value, (list, tuple)):
            return type(value)(self.ref(v) for v in value)
        if isinstance(value, dict):
            return {k: self.ref(v) for k, v in value.items()}
        if isinstance(value, slice):
            return slice(self.ref(value.start), self.ref(value.stop), self.ref(value.step))
        return value

    def record(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        outs = out if isinstance(out, (list, tuple)) else (out,)
        if not any(isinstance(o, torch.Tensor) for o in outs):
            return  # size(), dim(), item(), ...: no dataflow to record
        name = getattr(func, "__name__", str(func))
        if name == "__get__":  # a property such as Tensor.T
            name = getattr(getattr(func, "__self__", None), "__name__", name)
        op = "index" if name == "__getitem__" else _strip_inplace(name)
        ref_args, ref_kwargs = self.ref(tuple(args)), self.ref(dict(kwargs))
        inputs = tuple(dict.fromkeys(_node_refs((ref_args, ref_kwargs))))
        weight_of = None
        for value in (*args, *kwargs.values()):  # F.layer_norm passes weight= by keyword
            if isinstance(value, nn.Parameter) and self.tensor_names.get(id(value), ("", ""))[1].endswith("weight"):
                weight_of = self.tensor_names[id(value)][1].rpartition(".")[0]
                break
        module = weight_of if weight_of is not None else (self.stack[-1] if self.stack else None)
        node = self.new_name(op or "call")
        single = isinstance(out, torch.Tensor)
        self.add(node, kind="call", op=op, target=func, args=ref_args, kwargs=ref_kwargs, inputs=inputs,
                 module=module, weight_of=weight_of, tensor_name=None,
                 shape=tuple(out.shape) if single else None,
                 shapes=None if single else tuple(tuple(o.shape) if isinstance(o, torch.Tensor) else None for o in outs),
                 dtype=out.dtype if single else None)
        if single:
            self.node_of[id(out)] = node
            self.alive.append(out)
            return
        for index, value in enumerate(outs):
            if isinstance(value, torch.Tensor):
                item = self.add(self.new_name("getitem"), kind="call", op="getitem", target=operator.getitem,
                                args=(NodeRef(node), index), kwargs={}, inputs=(node,), module=module,
                                weight_of=None, tensor_name=None, shape=tuple(value.shape), shapes=None,
                                dtype=value.dtype)
                self.node_of[id(value)] = item
                self.alive.append(value)

    def trace(self, example_inputs: tuple[Any, ...]) -> ModuleGraph:
        tracer = self

        class Recorder(torch.overrides.TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]  # torch's protocol
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                tracer.record(func, args, kwargs, out)
                return out

        def pre_hook(module: nn.Module, args: Any) -> None:
            tracer.stack.append(tracer.module_names.get(id(module), ""))

        def post_hook(module: nn.Module, args: Any, output: Any) -> None:
            tracer.stack.pop()

        for index, value in enumerate(example_inputs):
            if isinstance(value, torch.Tensor):
                name = self.add(f"input_{index}", kind="input", op="", args=(), kwargs={}, inputs=(),
                                module=None, weight_of=None, tensor_name=None, shape=tuple(value.shape),
                                shapes=None, dtype=value.dtype)
                self.node_of[id(value)] = name
        handles = [
            nn.modules.module.register_module_forward_pre_hook(pre_hook),
            nn.modules.module.register_module_forward_hook(post_hook),
        ]
        try:
            with torch.no_grad(), Recorder():
                output = self.model(*example_inputs)
        finally:
            for handle in handles:
                handle.remove()
        outputs = _node_refs(self.ref(output)) if isinstance(output, torch.Tensor) else [
            r for r in _node_refs(self.ref(_tensors_of(output)))
        ]
        self.add("output", kind="output", op="", args=(tuple(NodeRef(n) for n in outputs),), kwargs={},
                 inputs=tuple(outputs), module=None, weight_of=None, tensor_name=None, shape=None,
                 shapes=None, dtype=None)
        nodes = {}
        for name, fields in self.nodes.items():
            fields = dict(fields)
            users = tuple(dict.fromkeys(fields.pop("users")))
            fields.setdefault("target", None)
            nodes[name] = OpNode(name=name, users=users, **fields)
        return ModuleGraph(nodes=nodes, method="eager", modules=self.modules)


def _node_refs(value: Any) -> list[str]:
    if isinstance(value, NodeRef):
        return [value.name]
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _node_refs(v)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _node_refs(v)]
    if isinstance(value, slice):
        return _node_refs((value.start, value.stop, value.step))
    return []


def _tensors_of(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _tensors_of(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors_of(v)]
    if hasattr(value, "to_tuple"):  # Hugging Face ModelOutput
        return _tensors_of(value.to_tuple())
    return []


def numel(shape: Sequence[int]) -> int:
    """Number of elements of ``shape``."""
    return math.prod(shape)
