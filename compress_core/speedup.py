"""Speedup: turn pruning masks into a physically smaller model whose outputs equal the masked one.

How it works (see ``docs/speedup.md``):

1. The user's model is deep-copied (the original is never modified, also not on failure),
   wrappers are removed from the copy and the user's masks are baked into it.
2. The copy's graph is captured (by default eagerly, with ``torch.export`` as the fallback;
   see :func:`compress_core.graph.capture_and_analyse`) and every tensor dim of every node
   gets a *keep mask*.
   Producers (``Linear``/``Conv*``/``ConvTranspose*``/``Embedding``) start their output
   channel dim with the channels their weight mask keeps; model inputs, graph outputs and dims
   that an op creates (spatial dims after a conv, reduced dims, slices, ...) keep everything.
   Op rules tie dims that carry the same channels (elementwise ops and residual sums,
   per-channel layers, permutes, ``cat``, ``view``/``reshape``/``flatten`` that split or merge
   dims such as heads x head_dim) and the masks are OR-ed to a fixed point. A channel is
   removed only where every producer of its dim removed it, so shapes stay consistent and
   removing it never changes data that some kept channel needs.
3. The reference is the masked model with masks so propagated and baked: per-channel tensors
   (biases, BatchNorm/LayerNorm affine, depthwise convs, PReLU slopes) of removed channels are
   zeroed, as the design says ("pruning an output channel removes the whole channel").
4. A removed channel can still carry a constant (``BatchNorm`` without affine, ``sigmoid``
   of zero, ...). It is measured on ``example_inputs`` at the input of the ``Linear``/``Conv``
   that reads it and folded into that layer's bias where this is exact (``Linear``, convs
   without padding); where it is not (padded convs, transposed convs) it is reported.
5. Every module with a tensor that shrinks is handed to its *replacer* (looked up along the
   class's MRO: replacers registered by plugins through ``compress_register_replacers``, then
   the built-ins for ``torch.nn`` layers) and put back under its dotted name.
6. The smaller model is run on ``example_inputs`` and compared with the reference.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
import torch
from torch import nn

from .errors import CompressError
from .graph import ModuleGraph, NodeRef, OpNode, capture_and_analyse

__all__ = [
    "BUILTIN_REPLACERS",
    "Replacer",
    "SpeedupError",
    "SpeedupReport",
    "SpeedupWarning",
    "apply_replacements",
    "find_replacer",
    "shrink_tensors",
    "speedup",
]

Replacer = Callable[[nn.Module, "dict[str, dict[int, torch.Tensor]]"], nn.Module]
"""``fn(module, keep) -> smaller module``; ``keep`` maps each of the module's own parameter and
buffer names (not recursive) to ``{dim: bool mask of the entries kept}`` for the dims that
shrink. The function may modify ``module`` and return it, or build a new module."""


class SpeedupError(CompressError):
    """Speedup cannot produce an equal, smaller model; nothing of the user's model was changed.

    :ivar node: the graph node concerned, if any.
    :ivar module: the dotted module name concerned, if any.
    """

    def __init__(self, message: str, *, node: str | None = None, module: str | None = None) -> None:
        super().__init__(message)
        self.node = node
        self.module = module


class SpeedupWarning(UserWarning):
    """The sped-up model differs from the reference where a constant could not be absorbed."""


@attrs.define
class SpeedupReport:
    """What :func:`speedup` did."""

    shapes: dict[str, dict[str, tuple[tuple[int, ...], tuple[int, ...]]]] = attrs.field(
        factory=dict
    )
    """``module -> tensor -> (old shape, new shape)`` for every tensor that shrank."""
    folded: list[str] = attrs.field(factory=list)
    """Modules whose bias absorbed the constant of removed input channels (exactly)."""
    inexact: list[str] = attrs.field(factory=list)
    """Removed channels whose constant could not be absorbed exactly, with the reason."""
    blocked: list[str] = attrs.field(factory=list)
    """Unsupported ops (``strict=False`` only) whose channels were kept, by node."""
    max_rel_error: float = 0.0
    """Largest relative difference between the sped-up model's outputs and the reference."""
    kept_whole: list[str] = attrs.field(factory=list)
    """Grouped convs (``1 < groups < channels``) kept whole because their masks do not remove
    whole groups (or they are transposed)."""
    capture_method: str = ""
    """The capture whose graph was used: ``"eager"``, ``"export"`` or ``"symbolic_trace"``."""


# -- replacers -----------------------------------------------------------------------------


def shrink_tensors(module: nn.Module, keep: Mapping[str, Mapping[int, torch.Tensor]]) -> nn.Module:
    """Index ``module``'s own parameters/buffers in place by ``keep`` (see :data:`Replacer`).

    Parameters stay parameters (new ``nn.Parameter`` objects with the same ``requires_grad``).
    """
    for name, dims in keep.items():
        tensor = getattr(module, name)
        new = tensor.detach()
        for dim, mask in dims.items():
            new = new.index_select(dim, torch.nonzero(mask.to(new.device), as_tuple=True)[0])
        new = new.clone()
        if name in module._parameters:
            module._parameters[name] = nn.Parameter(new, requires_grad=tensor.requires_grad)
        else:
            module._buffers[name] = new
    return module


def _replace_linear(module: Any, keep: dict[str, dict[int, torch.Tensor]]) -> nn.Module:
    shrink_tensors(module, keep)
    module.out_features, module.in_features = module.weight.shape
    return module


def _replace_conv(module: Any, keep: dict[str, dict[int, torch.Tensor]]) -> nn.Module:
    depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
    out_per_group = module.out_channels // module.groups
    shrink_tensors(module, keep)
    weight = module.weight
    if depthwise:
        module.groups = module.in_channels = module.out_channels = weight.shape[0]
    elif module.groups > 1 and not module.transposed:  # whole groups went (see _whole_groups)
        module.groups = weight.shape[0] // out_per_group
        module.out_channels, module.in_channels = weight.shape[0], weight.shape[1] * module.groups
    elif module.transposed:
        module.in_channels, module.out_channels = weight.shape[0], weight.shape[1] * module.groups
    else:
        module.out_channels, module.in_channels = weight.shape[0], weight.shape[1] * module.groups
    return module


def _replace_batchnorm(module: Any, keep: dict[str, dict[int, torch.Tensor]]) -> nn.Module:
    shrink_tensors(module, keep)
    source = module.weight if module.weight is not None else module.running_mean
    module.num_features = source.shape[0]
    return module


def _replace_layernorm(module: Any, keep: dict[str, dict[int, torch.Tensor]]) -> nn.Module:
    shrink_tensors(module, keep)
    if module.weight is not None:
        module.normalized_shape = tuple(module.weight.shape)
    return module


def _replace_groupnorm(module: Any, keep: dict[str, dict[int, torch.Tensor]]) -> nn.Module:
    shrink_tensors(module, keep)
    module.num_channels = module.weight.shape[0]
    return module


def _replace_embedding(module: Any, keep: dict[str, dict[int, torch.Tensor]]) -> nn.Module:
    shrink_tensors(module, keep)
    module.num_embeddings, module.embedding_dim = module.weight.shape
    return module


def _replace_prelu(module: Any, keep: dict[str, dict[int, torch.Tensor]]) -> nn.Module:
    shrink_tensors(module, keep)
    module.num_parameters = module.weight.shape[0]
    return module


BUILTIN_REPLACERS: dict[type, Replacer] = {
    nn.Linear: _replace_linear,
    nn.modules.conv._ConvNd: _replace_conv,
    nn.modules.batchnorm._NormBase: _replace_batchnorm,
    nn.LayerNorm: _replace_layernorm,
    nn.GroupNorm: _replace_groupnorm,
    nn.Embedding: _replace_embedding,
    nn.PReLU: _replace_prelu,
}
"""Replacers for ``torch.nn`` layers; plugins' replacers (``compress_register_replacers``) are
looked up first, so a plugin can also take over one of these types."""


def find_replacer(module: nn.Module, host: Any = None) -> Replacer | None:
    """The replacer for ``module``'s class: along the MRO, a plugin's, then a built-in one."""
    plugin_replacers: Mapping[type, tuple[str, Replacer]] = (
        getattr(host, "replacers", {}) if host else {}
    )
    for cls in type(module).__mro__:
        if cls in plugin_replacers:
            return plugin_replacers[cls][1]
        if cls in BUILTIN_REPLACERS:
            return BUILTIN_REPLACERS[cls]
    return None


def _has_plugin_replacer(module: nn.Module, host: Any) -> bool:
    plugin_replacers = getattr(host, "replacers", {}) if host else {}
    return any(cls in plugin_replacers for cls in type(module).__mro__)


def apply_replacements(
    model: nn.Module,
    keeps: Mapping[str, dict[str, dict[int, torch.Tensor]]],
    host: Any = None,
) -> list[str]:
    """Replace every module named in ``keeps`` (children before parents), in place on ``model``.

    Modules with a plugin replacer that contain a changed module are handed to it too (with an
    empty ``keep``), so e.g. an attention module can update its head count.

    :return: the names of the modules handed to a replacer, in order.
    :raises SpeedupError: a module with a shrinking tensor has no replacer.
    """
    modules = dict(model.named_modules())
    names = set(keeps)
    for name, module in modules.items():
        inside = any(other.startswith(name + ".") or (name == "" and other) for other in keeps)
        if name not in names and inside and _has_plugin_replacer(module, host):
            names.add(name)
    done = []
    for name in sorted(names, key=lambda n: -len(n.split(".")) if n else 0):
        module = modules[name]
        replacer = find_replacer(module, host)
        if replacer is None:
            tensors = ", ".join(sorted(keeps.get(name, {})))
            raise SpeedupError(
                f"module '{name}' ({type(module).__module__}.{type(module).__qualname__}) has tensors "
                f"that must shrink ({tensors}) but no replacer knows its type; register one with "
                f"registry.add_module_replacer({type(module).__name__}, fn) in a plugin's "
                f"compress_register_replacers hook, or exclude the channels that reach it from pruning",
                module=name,
            )
        new = replacer(module, dict(keeps.get(name, {})))
        if not isinstance(new, nn.Module):
            raise SpeedupError(
                f"the replacer for module '{name}' returned {type(new).__name__}, not an nn.Module",
                module=name,
            )
        if new is not module:
            _set_submodule(model, name, new)
        done.append(name)
    return done


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


# -- propagation -----------------------------------------------------------------------------

# Ops whose tensor arguments broadcast to the output elementwise.
_ELEMENTWISE = frozenset(
    [
        "add",
        "sub",
        "rsub",
        "mul",
        "div",
        "true_divide",
        "floor_divide",
        "remainder",
        "pow",
        "relu",
        "relu6",
        "hardtanh",
        "gelu",
        "silu",
        "sigmoid",
        "tanh",
        "hardswish",
        "hardsigmoid",
        "leaky_relu",
        "elu",
        "selu",
        "celu",
        "mish",
        "softplus",
        "softsign",
        "logsigmoid",
        "neg",
        "abs",
        "exp",
        "log",
        "log1p",
        "sqrt",
        "rsqrt",
        "reciprocal",
        "square",
        "clamp",
        "clamp_min",
        "clamp_max",
        "sin",
        "cos",
        "erf",
        "sign",
        "clone",
        "contiguous",
        "to",
        "_to_copy",
        "alias",
        "detach",
        "lift_fresh_copy",
        "type_as",
        "float",
        "half",
        "double",
        "bfloat16",
        "dropout",
        "feature_dropout",
        "alpha_dropout",
        "where",
        "masked_fill",
        "maximum",
        "minimum",
        "eq",
        "ne",
        "lt",
        "le",
        "gt",
        "ge",
        "and",
        "or",
        "bitwise_and",
        "bitwise_or",
        "logical_and",
        "logical_or",
        "logical_not",
        "bitwise_not",
        "lerp",
        "addcmul",
        "zeros_like",
        "ones_like",
        "full_like",
    ]
)
_POOLS = frozenset(
    [
        "max_pool1d",
        "max_pool2d",
        "max_pool3d",
        "avg_pool1d",
        "avg_pool2d",
        "avg_pool3d",
        "adaptive_avg_pool1d",
        "adaptive_avg_pool2d",
        "adaptive_avg_pool3d",
        "_adaptive_avg_pool2d",
        "adaptive_max_pool1d",
        "adaptive_max_pool2d",
        "upsample_nearest2d",
        "upsample_bilinear2d",
    ]
)
_RESHAPES = frozenset(
    {"view", "reshape", "_unsafe_view", "flatten", "unsqueeze", "squeeze", "unflatten"}
)
_REDUCTIONS = frozenset({"mean", "sum", "amax", "amin", "std", "var", "prod", "logsumexp", "norm"})
_SOFTMAX = frozenset({"softmax", "_softmax", "log_softmax", "_log_softmax"})
_FACTORIES = frozenset(
    {
        "arange",
        "ones",
        "zeros",
        "full",
        "empty",
        "new_ones",
        "new_zeros",
        "new_full",
        "new_empty",
        "scalar_tensor",
        "tensor",
        "randn",
        "rand",
    }
)
_NO_OUTPUT = frozenset(
    {"_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size", "_assert_async"}
)
_CONVS = frozenset({"conv1d", "conv2d", "conv3d"})
_CONV_TRANSPOSES = frozenset({"conv_transpose1d", "conv_transpose2d", "conv_transpose3d"})
_BATCH_NORMS = frozenset(
    {"batch_norm", "_native_batch_norm_legit_no_training", "native_batch_norm"}
)

# (node, dim) of a tensor dim in the graph.
Dim = tuple[str, int]


class _Propagation:
    """Keep masks per node dim, relations between them, and the fixed point."""

    def __init__(
        self, graph: ModuleGraph, out_keep: Callable[[str, int], torch.Tensor | None], strict: bool
    ) -> None:
        self.graph = graph
        self.out_keep = out_keep
        self.keep: dict[str, list[torch.Tensor]] = {}
        self.ties: list[tuple[Dim, Dim]] = []
        self.reshapes: list[tuple[str, list[int], str, list[int]]] = []
        self.cats: list[tuple[str, int, list[tuple[str, int, int]]]] = []
        self.pins: set[Dim] = set()
        self.related: set[Dim] = set()
        self.sources: set[Dim] = set()
        self.contracted: set[Dim] = set()
        """Parameter dims that a layer contracts over (a Linear's in-features): not zeroed."""
        self.unknown: list[OpNode] = []
        self.grouped: list[tuple[str | None, str, int, int, int]] = []
        """Grouped convs that lose whole groups: (input, output, groups, in and out per group)."""
        self.kept_whole: list[str] = []
        self.strict = strict
        for node in graph:
            if node.shape is not None:
                self.keep[node.name] = [torch.zeros(s, dtype=torch.bool) for s in node.shape]

    # relation builders
    def shape(self, name: str | None) -> tuple[int, ...] | None:
        return self.graph[name].shape if name is not None and name in self.keep else None

    def tie(self, a: str | None, da: int, b: str | None, db: int) -> None:
        sa, sb = self.shape(a), self.shape(b)
        if a is None or b is None or sa is None or sb is None:
            return
        da, db = da % len(sa), db % len(sb)
        if sa[da] != sb[db]:
            return
        self.ties.append(((a, da), (b, db)))
        self.related.update({(a, da), (b, db)})

    def pin(self, name: str | None, dims: Iterable[int] | None = None) -> None:
        shape = self.shape(name)
        if shape is None or name is None:
            return
        for d in range(len(shape)) if dims is None else dims:
            self.pins.add((name, d % len(shape)))
            self.related.add((name, d % len(shape)))

    def broadcast(self, out: str, inputs: Iterable[str]) -> None:
        out_shape = self.shape(out)
        if out_shape is None:
            return
        for name in inputs:
            shape = self.shape(name)
            if shape is None:
                continue
            for k in range(1, min(len(shape), len(out_shape)) + 1):
                if shape[-k] == out_shape[-k]:
                    self.tie(name, len(shape) - k, out, len(out_shape) - k)

    def reshape(self, src: str, dst: str) -> None:
        s, t = self.shape(src), self.shape(dst)
        if s is None or t is None or math.prod(s) != math.prod(t):
            self.pin(src)
            return
        i = j = 0
        while i < len(s) or j < len(t):
            gi, gj = [i] if i < len(s) else [], [j] if j < len(t) else []
            pi = s[i] if i < len(s) else 1
            pj = t[j] if j < len(t) else 1
            i, j = i + 1, j + 1
            while pi != pj:
                if pi < pj and i < len(s):
                    pi *= s[i]
                    gi.append(i)
                    i += 1
                elif j < len(t):
                    pj *= t[j]
                    gj.append(j)
                    j += 1
                else:
                    break
            gi = [d for d in gi if s[d] != 1]
            gj = [d for d in gj if t[d] != 1]
            if len(gi) == 1 and len(gj) == 1:
                self.tie(src, gi[0], dst, gj[0])
            elif gi and gj:
                self.reshapes.append((src, gi, dst, gj))
                self.related.update({(src, d) for d in gi} | {(dst, d) for d in gj})

    # rules
    def build(self, unknown_pins: bool) -> None:
        g = self.graph
        for node in g:
            if node.kind == "input":
                self.pin(node.name)
            elif node.kind == "output":
                for name in node.inputs:
                    self.pin(name)
            elif node.kind == "call":
                self.rule(node, unknown_pins)
        # Dims that no producer reaches (conv kernels, an Embedding's vocabulary, spatial dims,
        # position ids built from buffers) keep everything: nothing removes entries from them.
        parent: dict[Dim, Dim] = {}

        def find(a: Dim) -> Dim:
            while parent.setdefault(a, a) != a:
                parent[a] = parent[parent[a]]
                a = parent[a]
            return a

        def union(a: Dim, b: Dim) -> None:
            parent[find(a)] = find(b)

        for a, b in self.ties:
            union(a, b)
        for out, dim, pieces in self.cats:
            for name, _, _ in pieces:
                union((out, dim), (name, dim))
        sourced = {find(d) for d in self.pins | self.sources}
        # A reshape is not a tie: flattening [B, C, H, W] to [B, C*H*W] must not make the
        # spatial dims "reached" because the channels are. A merged dim is reached when one of
        # its parts is; the parts of a split (heads x head_dim) when the merged dim they come
        # from is; dims on both sides of a many-to-many regrouping all together.
        changed = True
        while changed:
            changed = False
            for src, gi, dst, gj in self.reshapes:
                before = [find((src, d)) for d in gi]
                after = [find((dst, d)) for d in gj]
                implied: list[Dim] = []
                if len(after) == 1:
                    if any(r in sourced for r in before):
                        implied = after
                elif len(before) == 1:
                    if before[0] in sourced:
                        implied = after
                    elif any(r in sourced for r in after):
                        implied = before
                elif any(r in sourced for r in before + after):
                    implied = before + after
                new = set(implied) - sourced
                if new:
                    sourced |= new
                    changed = True
        for name, masks in self.keep.items():
            for d in range(len(masks)):
                if find((name, d)) not in sourced:
                    self.pins.add((name, d))

    def _whole_groups(
        self,
        node: OpNode,
        transposed: bool,
        groups: Any,
        xs: tuple[int, ...] | None,
        os_: tuple[int, ...] | None,
    ) -> bool:
        """Whether a grouped (not depthwise) conv can lose whole groups.

        Only a non-transposed conv whose own weight mask keeps or removes each group's output
        channels all together; otherwise it is kept whole, and said so when its mask removes
        something.
        """
        module = node.weight_of
        if module is None or not isinstance(groups, int) or xs is None or os_ is None:
            return False
        mask = self.out_keep(module, 0)
        if mask is None or bool(mask.all()):
            return not transposed and mask is not None and os_[1] % groups == 0 == xs[1] % groups
        per_group = mask.reshape(groups, -1) if mask.numel() % groups == 0 else None
        if transposed:
            reason = "a transposed grouped conv"
        elif per_group is None or bool((per_group.any(1) != per_group.all(1)).any()):
            reason = "its mask removes part of a group"
        else:
            return os_[1] % groups == 0 == xs[1] % groups
        self.kept_whole.append(f"'{module}' (groups={groups}): {reason}; kept whole")
        return False

    def ref(self, node: OpNode, index: int, key: str | None = None) -> str | None:
        value = self.graph.arg(node, index, key)
        return value.name if isinstance(value, NodeRef) else None

    def tensor_args(self, node: OpNode) -> list[str]:
        return [n for n in node.inputs if n in self.keep]

    def producer(self, node: OpNode, dim: int, weight_dim: int) -> None:
        module = node.weight_of
        if module is None or node.shape is None:
            return
        mask = self.out_keep(module, weight_dim)
        d = dim % len(node.shape)
        if mask is None or mask.numel() != node.shape[d]:
            self.pin(node.name, [d])
        else:
            self.keep[node.name][d] |= mask
            self.sources.add((node.name, d))

    def rule(self, node: OpNode, unknown_pins: bool) -> None:
        op, out = node.op, node.name
        x = self.ref(node, 0)
        if op in _ELEMENTWISE:
            self.broadcast(out, self.tensor_args(node))
        elif op == "linear":
            w, b = self.ref(node, 1), self.ref(node, 2, "bias")
            xs = self.shape(x)
            if xs is not None:
                for d in range(len(xs) - 1):
                    self.tie(x, d, out, d)
            self.tie(w, 0, out, -1)
            self.tie(w, 1, x, -1)
            self.contracted.add((w, 1)) if w else None
            self.tie(b, 0, out, -1)
            self.producer(node, -1, 0)
        elif op in _CONVS or op in _CONV_TRANSPOSES:
            transposed = op in _CONV_TRANSPOSES
            w, b = self.ref(node, 1), self.ref(node, 2, "bias")
            groups = self.graph.arg(
                node, 6, "groups", 1
            )  # same slot in conv2d and conv_transpose2d
            self.tie(x, 0, out, 0)
            self.tie(b, 0, out, 1)
            xs, os_ = self.shape(x), self.shape(out)
            if groups == 1:
                self.tie(w, 1 if transposed else 0, out, 1)
                self.tie(w, 0 if transposed else 1, x, 1)
                self.contracted.add((w, 0 if transposed else 1)) if w else None
                self.producer(node, 1, 1 if transposed else 0)
            elif (
                not transposed and xs is not None and os_ is not None and groups == xs[1] == os_[1]
            ):
                # depthwise: channel c in, channel c out
                self.tie(w, 0, out, 1)
                self.tie(x, 1, out, 1)
                self.producer(node, 1, 0)
            elif self._whole_groups(node, transposed, groups, xs, os_):
                # Whole groups go: one kept output channel, or one kept input channel, keeps
                # its whole group on both sides (solve); weight dim 1 stays per-group.
                self.tie(w, 0, out, 1)
                self.producer(node, 1, 0)
                assert xs is not None and os_ is not None  # checked by _whole_groups
                self.grouped.append((x, out, groups, xs[1] // groups, os_[1] // groups))
                self.related.update({(str(x), 1), (out, 1)})
            else:  # kept whole: see _whole_groups
                self.pin(x, [1])
                self.pin(out, [1])
                self.pin(w)
                self.pin(b)
        elif op == "embedding":
            w, idx = self.ref(node, 0), self.ref(node, 1)
            if w is not None and self.graph[w].kind != "parameter":  # F.embedding(input, weight)
                w, idx = idx, w
            ids = self.shape(idx)
            if ids is not None:
                for d in range(len(ids)):
                    self.tie(idx, d, out, d)
            self.tie(w, 1, out, -1)
            self.producer(node, -1, 1)
        elif op in _BATCH_NORMS:
            self.broadcast(out, [x] if x else [])
            # weight, bias and running statistics, wherever the capture put them (ATen's
            # batch_norm and F.batch_norm order them differently)
            for other in self.tensor_args(node):
                if other != x:
                    self.tie(other, 0, x, 1)
        elif op in {"layer_norm", "rms_norm"}:
            normalized = self.graph.arg(node, 1, "normalized_shape")
            n = len(normalized) if isinstance(normalized, (list, tuple)) else 1
            self.broadcast(out, [x] if x else [])
            self.pin(x, range(-n, 0))
            for p in self.tensor_args(node):
                ps = self.shape(p) if p != x else None
                if ps is not None:
                    for k in range(1, len(ps) + 1):
                        self.tie(p, -k, x, -k)
        elif op == "group_norm":
            self.broadcast(out, [x] if x else [])
            self.pin(x, [1])
            for other in self.tensor_args(node):
                if other != x:
                    self.tie(other, 0, x, 1)
        elif op == "prelu":
            w = self.ref(node, 1)
            self.broadcast(out, [x] if x else [])
            ws = self.shape(w)
            if ws is not None and math.prod(ws) > 1:
                self.tie(w, 0, x, 1)
        elif op in _POOLS:
            self.tie(x, 0, out, 0)
            self.tie(x, 1, out, 1)
        elif op in _RESHAPES:
            self.reshape(x, out) if x else None
        elif op == "expand":
            self.broadcast(out, [x] if x else [])
        elif op in {"permute", "transpose", "t"}:
            xs = self.shape(x)
            if xs is None:
                return
            n = len(xs)
            if op == "permute":
                dims = self.graph.arg(node, 1, "dims")
                if isinstance(dims, int):  # Tensor.permute(0, 2, 1), as the eager capture sees it
                    dims = node.args[1:]
                perm = [p % n for p in dims]
            else:
                d0 = self.graph.arg(node, 1, "dim0", 0) % n if n else 0
                d1 = self.graph.arg(node, 2, "dim1", 1) % n if n else 0
                perm = list(range(n))
                if n >= 2:
                    if op == "t":
                        d0, d1 = 0, 1
                    perm[d0], perm[d1] = perm[d1], perm[d0]
            for i, p in enumerate(perm):
                self.tie(x, p, out, i)
        elif op in {"cat", "concat", "concatenate"}:
            parts = self.graph.arg(node, 0, "tensors")
            dim = self.graph.arg(node, 1, "dim", 0)
            os_ = self.shape(out)
            if os_ is None:
                return
            dim %= len(os_)
            pieces, offset = [], 0
            for part in parts:
                part_shape = self.shape(part.name) if isinstance(part, NodeRef) else None
                if part_shape is None:
                    self.pin(out)
                    return
                size = part_shape[dim]
                pieces.append((part.name, offset, size))
                offset += size
                for d in range(len(os_)):
                    if d != dim:
                        self.tie(part.name, d, out, d)
                self.related.add((part.name, dim))
            self.cats.append((out, dim, pieces))
            self.related.add((out, dim))
        elif op == "slice":
            dim = self.graph.arg(node, 1, "dim", 0)
            xs = self.shape(x)
            if xs is None:
                return
            dim %= len(xs)
            for d in range(len(xs)):
                if d != dim:
                    self.tie(x, d, out, d)
            self.pin(x, [dim])
        elif op in _SOFTMAX:
            dim = self.graph.arg(node, 1, "dim")
            self.broadcast(out, [x] if x else [])
            self.pin(x, [dim] if isinstance(dim, int) else None)
        elif op in _REDUCTIONS:
            xs = self.shape(x)
            if xs is None:
                return
            dims = self.graph.arg(node, 1, "dim")
            keepdim = bool(self.graph.arg(node, 2, "keepdim", False))
            if dims is None or dims == []:
                self.pin(x)
                return
            dims = {d % len(xs) for d in ([dims] if isinstance(dims, int) else dims)}
            self.pin(x, dims)
            kept = [d for d in range(len(xs)) if d not in dims]
            for i, d in enumerate(kept):
                self.tie(x, d, out, d if keepdim else i)
        elif op in {"matmul", "bmm"}:
            a, b = x, self.ref(node, 1)
            sa, sb, so = self.shape(a), self.shape(b), self.shape(out)
            if sa is None or sb is None or so is None or len(sa) < 2 or len(sb) < 2:
                self.pin(a)
                self.pin(b)
                return
            self.tie(a, -2, out, -2)
            self.tie(b, -1, out, -1)
            self.pin(a, [-1])
            self.pin(b, [-2])
            for operand, oshape in ((a, sa), (b, sb)):
                for kk in range(3, min(len(oshape), len(so)) + 1):
                    if oshape[-kk] == so[-kk]:
                        self.tie(operand, len(oshape) - kk, out, len(so) - kk)
        elif op == "scaled_dot_product_attention":
            qn, kn, vn = x, self.ref(node, 1), self.ref(node, 2)
            so = self.shape(out)
            if so is None:
                return
            for operand in (qn, kn, vn):
                qkv_shape = self.shape(operand)
                if qkv_shape is None:
                    continue
                for kk in range(3, min(len(qkv_shape), len(so)) + 1):
                    if qkv_shape[-kk] == so[-kk]:
                        self.tie(operand, len(qkv_shape) - kk, out, len(so) - kk)
            self.tie(qn, -2, out, -2)
            self.tie(vn, -1, out, -1)
            self.tie(kn, -2, vn, -2)
            self.pin(qn, [-1])
            self.pin(kn, [-1, -2])
            self.pin(vn, [-2])
            for extra in node.inputs:
                if extra not in (qn, kn, vn):
                    self.pin(extra)
        elif op in _FACTORIES or op in _NO_OUTPUT:
            return
        else:
            self.unknown.append(node)
            if unknown_pins:
                for name in self.tensor_args(node):
                    self.pin(name)

    def solve(self) -> None:
        keep = self.keep
        for name, d in self.pins:
            keep[name][d][:] = True
        changed = True
        while changed:
            changed = False
            for (a, da), (b, db) in self.ties:
                ma, mb = keep[a][da], keep[b][db]
                if not torch.equal(ma, mb):
                    merged = ma | mb
                    keep[a][da], keep[b][db] = merged, merged.clone()
                    changed = True
            for src, gi, dst, gj in self.reshapes:
                changed |= self._spread(src, gi, dst, gj)
                changed |= self._spread(dst, gj, src, gi)
            for x, out, groups, in_g, out_g in self.grouped:
                alive = keep[out][1].reshape(groups, out_g).any(1)
                if x is not None and x in keep:
                    alive |= keep[x][1].reshape(groups, in_g).any(1)
                for side, size in ((out, out_g), (x, in_g)):
                    if side is None or side not in keep:
                        continue
                    merged = keep[side][1] | alive.repeat_interleave(size)
                    if not torch.equal(merged, keep[side][1]):
                        keep[side][1] = merged
                        changed = True
            for out, dim, pieces in self.cats:
                for name, offset, size in pieces:
                    seg = keep[out][dim][offset : offset + size]
                    merged = seg | keep[name][dim]
                    if not torch.equal(merged, seg) or not torch.equal(merged, keep[name][dim]):
                        keep[out][dim][offset : offset + size] = merged
                        keep[name][dim] = merged.clone()
                        changed = True

    def _spread(self, src: str, gi: list[int], dst: str, gj: list[int]) -> bool:
        masks = [self.keep[src][d] for d in gi]
        flat = functools.reduce(lambda a, b: (a[:, None] & b[None, :]).reshape(-1), masks)
        sizes = [self.keep[dst][d].numel() for d in gj]
        grid = flat.reshape(sizes)
        changed = False
        for axis, d in enumerate(gj):
            other = [k for k in range(len(gj)) if k != axis]
            mask = grid.any(dim=other) if other else grid
            merged = self.keep[dst][d] | mask
            if not torch.equal(merged, self.keep[dst][d]):
                self.keep[dst][d] = merged
                changed = True
        return changed

    def partial(self, name: str) -> list[int]:
        return [d for d, m in enumerate(self.keep.get(name, [])) if not bool(m.all())]


# -- speedup ------------------------------------------------------------------------------------


# Which dim of a producer's weight holds its output channels.
def _out_dim(module: nn.Module) -> int:
    if isinstance(module, nn.Embedding):
        return 1
    if isinstance(module, nn.modules.conv._ConvNd) and module.transposed:
        return 1
    return 0


def speedup(
    model: nn.Module,
    masks: Mapping[str, Mapping[str, torch.Tensor]],
    example_inputs: tuple[Any, ...],
    *,
    strict: bool = True,
    rtol: float = 1e-5,
    return_report: bool = False,
    host: Any = None,
    capture_method: str = "auto",
) -> Any:
    """Return a physically smaller copy of ``model`` whose outputs equal the masked model's.

    ``model`` is never modified: speedup works on a deep copy (wrappers on the copy are removed
    without baking; ``masks`` is what counts). Replaced modules keep their dotted names.

    :param model: the model, wrapped by a compressor or not.
    :param masks: ``{module_name: {target_name: mask}}`` as returned by ``comp.compress()``
        (``True``/1 = kept); only parameter and buffer targets.
    :param example_inputs: a tuple of positional arguments for ``model``.
    :param strict: raise on an op that would carry removed channels but has no propagation
        rule; with ``False`` such channels are kept and listed in the report.
    :param rtol: the largest relative error accepted against the reference (eval mode).
    :param return_report: also return a :class:`SpeedupReport`.
    :param host: the plugin host whose replacers to use (default: the process-wide one).
    :param capture_method: ``"auto"`` (the default: the eager capture, falling back to
        ``torch.export`` when the eager forward raises or removed channels reach an op of the
        eager graph that has no rule), ``"export"`` or ``"eager"`` (several times faster than
        export); see :func:`compress_core.graph.capture_and_analyse`. The result is verified
        either way.
    :return: the smaller model, or ``(model, report)`` with ``return_report=True``.
    :raises SpeedupError: naming the graph node and/or module, before anything is returned.
    """
    from . import wrapper
    from .registry import get_host

    if not isinstance(example_inputs, tuple):
        raise SpeedupError(
            "example_inputs must be a tuple of positional arguments (as for torch.export); wrap one tensor as (x,)"
        )
    host = get_host() if host is None else host
    modules = dict(model.named_modules())
    bool_masks = _check_masks(modules, masks)
    work = copy.deepcopy(model)
    wrapper.unwrap(work, bake=False)
    training = {name: m.training for name, m in work.named_modules()}
    report = SpeedupReport()
    work_modules = dict(work.named_modules())
    with torch.no_grad():
        for module_name, targets in bool_masks.items():
            for target, mask in targets.items():
                tensor = getattr(work_modules[module_name], target)
                tensor.mul_(mask.to(tensor.dtype))

    def out_keep(module_name: str, weight_dim: int) -> torch.Tensor | None:
        module = work_modules.get(module_name)
        if module is None:
            return None
        mask = bool_masks.get(module_name, {}).get("weight")
        if mask is None:
            return torch.ones(module.weight.shape[_out_dim(module)], dtype=torch.bool)
        d = _out_dim(module)
        return mask.any(dim=[k for k in range(mask.dim()) if k != d]) if mask.dim() > 1 else mask

    def analyse(captured: ModuleGraph, last: bool) -> tuple[ModuleGraph, _Propagation] | None:
        solved = _solve(captured, out_keep, strict, report, last)
        return None if solved is None else (captured, solved)

    graph, prop = capture_and_analyse(work, example_inputs, capture_method, analyse)
    report.capture_method = graph.method
    keeps, zero = _tensor_keeps(graph, prop)
    work.eval()
    with torch.no_grad():
        for module_name, tensors in zero.items():
            for name, dims in tensors.items():
                tensor = getattr(work_modules[module_name], name)
                for d, mask in dims.items():
                    tensor.index_fill_(d, torch.nonzero(~mask).flatten(), 0)
        constants, reference = _measure_constants(work, graph, prop, example_inputs)
        deltas = _bias_deltas(work_modules, graph, prop, constants, report)
        for module_name, tensors in keeps.items():
            for name, dims in tensors.items():
                old = tuple(getattr(work_modules[module_name], name).shape)
                new = tuple(int(dims[d].sum()) if d in dims else s for d, s in enumerate(old))
                report.shapes.setdefault(module_name, {})[name] = (old, new)
        replaced = apply_replacements(work, keeps, host)
        added_bias = _add_deltas(work, keeps, deltas)
        report.folded = sorted(deltas)
        try:
            result = _flat_outputs(work(*example_inputs))
        except Exception as exc:  # the user's forward can fail in many ways after shrinking
            raise SpeedupError(
                f"the smaller model's forward failed ({type(exc).__name__}: {exc}); a module's forward "
                "probably relies on a size (e.g. a head count) that shrank: register a replacer for "
                "that module type with compress_register_replacers that updates it"
            ) from exc
    for name, module in work.named_modules():
        module.training = training.get(name, module.training)
    report.max_rel_error = _max_rel_error(result, reference)
    if report.max_rel_error > rtol:
        message = f"the sped-up model's outputs differ from the reference by {report.max_rel_error:.3g} (relative)"
        if report.inexact:
            warnings.warn(
                message + "; not absorbed exactly: " + "; ".join(report.inexact),
                SpeedupWarning,
                stacklevel=2,
            )
        else:
            raise SpeedupError(message + "; this is a bug in a propagation rule or a replacer")
    elif report.inexact:
        warnings.warn(
            "constants not absorbed exactly: " + "; ".join(report.inexact),
            SpeedupWarning,
            stacklevel=2,
        )
    work.__dict__["_compress_pruned"] = {
        "modules": {
            name: {
                t: {str(d): torch.nonzero(m).flatten().tolist() for d, m in dims.items()}
                for t, dims in keeps.get(name, {}).items()
            }
            for name in replaced
        },
        "added_bias": added_bias,
    }
    return (work, report) if return_report else work


def _check_masks(
    modules: Mapping[str, nn.Module], masks: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, torch.Tensor]]:
    if not isinstance(masks, Mapping):
        raise SpeedupError(
            f"masks must be {{module_name: {{target_name: mask}}}}, got {type(masks).__name__}"
        )
    out: dict[str, dict[str, torch.Tensor]] = {}
    for module_name, targets in masks.items():
        module = modules.get(module_name)
        if module is None:
            raise SpeedupError(
                f"masks name module '{module_name}', which the model does not have",
                module=module_name,
            )
        for target, mask in targets.items():
            tensor = getattr(module, target, None) if not target.startswith("_") else None
            if not isinstance(tensor, torch.Tensor):
                raise SpeedupError(
                    f"mask for '{module_name}' target '{target}': speedup uses parameter and buffer masks "
                    "only (input/output masks cannot be turned into smaller layers); drop it from masks",
                    module=module_name,
                )
            mask = torch.as_tensor(mask).detach().cpu()
            if tuple(mask.shape) != tuple(tensor.shape):
                raise SpeedupError(
                    f"mask for '{module_name}' target '{target}' has shape {tuple(mask.shape)}, the tensor {tuple(tensor.shape)}",
                    module=module_name,
                )
            out.setdefault(module_name, {})[target] = (
                mask if mask.dtype == torch.bool else mask != 0
            )
    return out


def _solve(
    graph: ModuleGraph,
    out_keep: Callable[[str, int], torch.Tensor | None],
    strict: bool,
    report: SpeedupReport,
    last: bool = True,
) -> _Propagation | None:
    # First with unknown ops neutral: an unknown op only matters if removed channels reach it.
    prop = _Propagation(graph, out_keep, strict)
    prop.build(unknown_pins=False)
    prop.solve()
    blocking = [n for n in prop.unknown if any(prop.partial(i) for i in n.inputs if i in prop.keep)]
    if not blocking:
        report.kept_whole = prop.kept_whole
        return prop
    if not last:
        return None  # capture_method="auto": another capture may see ops that have rules
    if strict:
        node = blocking[0]
        dims = {i: prop.partial(i) for i in node.inputs if prop.partial(i)}
        raise SpeedupError(
            f"graph node '{node.name}' (op '{node.op}', in module '{node.module or '<root>'}') would receive "
            f"pruned channels (dims {dims}) but speedup has no rule for '{node.op}'; exclude the modules "
            "whose channels reach it from pruning, or pass strict=False to keep those channels",
            node=node.name,
            module=node.module,
        )
    report.blocked = [f"{n.name} ({n.op} in '{n.module or '<root>'}')" for n in blocking]
    prop = _Propagation(graph, out_keep, strict)
    prop.build(unknown_pins=True)
    prop.solve()
    report.kept_whole = prop.kept_whole
    return prop


def _tensor_keeps(
    graph: ModuleGraph, prop: _Propagation
) -> tuple[
    dict[str, dict[str, dict[int, torch.Tensor]]], dict[str, dict[str, dict[int, torch.Tensor]]]
]:
    """``module -> tensor -> {dim: keep}`` for tensors that shrink; and the dims to zero."""
    keeps: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    zero: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for node in graph:
        if node.kind not in ("parameter", "buffer") or node.tensor_name is None:
            continue
        dims = prop.partial(node.name)
        if not dims:
            continue
        module_name, _, tensor = node.tensor_name.rpartition(".")
        keeps.setdefault(module_name, {})[tensor] = {
            d: prop.keep[node.name][d].clone() for d in dims
        }
        if node.kind == "parameter":
            per_channel = {
                d: prop.keep[node.name][d] for d in dims if (node.name, d) not in prop.contracted
            }
            if per_channel:
                zero.setdefault(module_name, {})[tensor] = per_channel
    return keeps, zero


def _consumers(graph: ModuleGraph, prop: _Propagation) -> list[tuple[OpNode, str, int]]:
    """``(node, input node, channel dim)`` of Linear/Conv ops that read removed channels."""
    out = []
    for node in graph.calls():
        if node.weight_of is None or getattr(graph.modules.get(node.weight_of), "groups", 1) > 1:
            continue  # a grouped conv's removed inputs feed only its removed outputs
        x = prop.ref(node, 0)
        if node.op == "linear":
            dim = -1
        elif node.op in _CONVS or node.op in _CONV_TRANSPOSES:
            dim = 1
        else:
            continue
        if (
            x is not None
            and x in prop.keep
            and prop.partial(x)
            and (dim % len(prop.keep[x])) in prop.partial(x)
        ):
            w = prop.ref(node, 1)
            if w is not None and prop.partial(w):
                out.append((node, x, dim))
    return out


def _measure_constants(
    work: nn.Module, graph: ModuleGraph, prop: _Propagation, example_inputs: tuple[Any, ...]
) -> tuple[dict[str, list[torch.Tensor]], list[torch.Tensor]]:
    """The inputs of the layers that read removed channels, and the reference outputs (one run)."""
    wanted = {node.weight_of: (x, dim) for node, x, dim in _consumers(graph, prop)}
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, module in work.named_modules():
        if name in wanted:

            def hook(module: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
                seen.setdefault(name, []).append(args[0].detach().clone())

            handles.append(module.register_forward_pre_hook(hook))
    try:
        outputs = _flat_outputs(work(*example_inputs))
    finally:
        for handle in handles:
            handle.remove()
    return seen, outputs


def _bias_deltas(
    modules: Mapping[str, nn.Module],
    graph: ModuleGraph,
    prop: _Propagation,
    constants: Mapping[str, list[torch.Tensor]],
    report: SpeedupReport,
) -> dict[str, torch.Tensor]:
    deltas: dict[str, torch.Tensor] = {}
    for node, x, dim in _consumers(graph, prop):
        name = str(node.weight_of)
        module: Any = modules[name]
        removed = ~prop.keep[x][dim]
        values = constants.get(name, [])
        if not values:
            continue
        value = values[0]
        if dim == -1 or dim == value.dim() - 1:
            sample = value.reshape(-1, value.shape[-1])[:, removed]
        else:
            sample = value.movedim(1, -1).reshape(-1, value.shape[1])[:, removed]
        const = sample[0]
        scale = float(sample.abs().max()) if sample.numel() else 0.0
        varies = any(
            float(
                (
                    v.movedim(1, -1).reshape(-1, v.shape[1])
                    if dim == 1
                    else v.reshape(-1, v.shape[-1])
                )[:, removed]
                .sub(const)
                .abs()
                .max()
            )
            > 1e-6 * (1 + scale)
            for v in values
            if sample.numel()
        )
        if scale == 0.0:
            continue
        if varies:
            report.inexact.append(
                f"'{name}': removed input channels carry values that vary with the input"
            )
            continue
        weight = module.weight.detach()
        if node.op == "linear":
            delta = weight[:, removed] @ const
        elif node.op in _CONV_TRANSPOSES:
            report.inexact.append(
                f"'{name}': a transposed conv cannot absorb the constant of removed input channels"
            )
            continue
        else:
            delta = weight[:, removed].sum(dim=list(range(2, weight.dim()))) @ const
            padding = module.padding if isinstance(module.padding, tuple) else (module.padding,)
            if module.padding == "same" or any(p != 0 for p in padding if isinstance(p, int)):
                # at the borders the kernel also reads zero padding, which the bias cannot mimic
                report.inexact.append(
                    f"'{name}': padded conv reads removed channels with a constant value "
                    f"(max {scale:.3g}); folded into its bias, exact away from the borders only"
                )
        deltas[name] = delta
    return deltas


def _add_deltas(
    work: nn.Module, keeps: Mapping[str, Any], deltas: Mapping[str, torch.Tensor]
) -> list[str]:
    added: list[str] = []
    for name, delta in deltas.items():
        module: Any = work.get_submodule(name)
        out_keep = keeps.get(name, {}).get("weight", {}).get(_out_dim(module))
        if out_keep is not None:
            delta = delta[out_keep]
        if module.bias is None:
            module.bias = nn.Parameter(torch.zeros_like(delta))
            added.append(name)
        module.bias.data += delta.to(module.bias.dtype)
    return added


def _flat_outputs(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value.detach()]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _flat_outputs(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flat_outputs(v)]
    return []


def _max_rel_error(result: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    if len(result) != len(reference):
        return math.inf
    worst = 0.0
    for a, b in zip(result, reference):
        if a.shape != b.shape:
            return math.inf
        if b.numel() == 0:
            continue
        denom = float(b.abs().max()) or 1.0
        worst = max(worst, float((a.double() - b.double()).abs().max()) / denom)
    return worst
