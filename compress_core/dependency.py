"""Dependency detection: which modules' output channels must be pruned at the same positions.

The analysis follows channels through the graph captured by :mod:`compress_core.graph`. Each
*producer* (``Linear``, ``Conv*``, ``ConvTranspose*``, ``Embedding``) starts a channel set on
its output's channel dim (the last dim for ``Linear``/``Embedding``, dim 1 for convolutions).
The set is carried through ops that keep channels where they are (activations, dropout,
batch/layer/group norm, pooling, ``softmax``, casts, padding), moved by ``permute``/
``transpose`` and by ``view``/``reshape``/``flatten`` when the channel dim can still be found in
the new shape, and dropped where it cannot (reading channels, e.g. as the input of a
``Linear`` or a dense conv, ends it). Sets are *coupled* (union-find) where two of them must
keep the same positions:

- elementwise ops between tensors (``add``, ``sub``, ``mul``, ``div``, ``where``, ...) whose
  channel dims meet without broadcasting: residual sums, gated MLPs (``act(gate(x)) * up(x)``);
- ``cat``/``stack`` on another dim (``cat`` on the channel dim concatenates channels and does
  not couple);
- depthwise and other grouped convs whose groups map channel for channel
  (``in_channels == out_channels``): the input's set and the conv's own set are one;
- attention: a ``view`` that splits channels into ``(heads, head_dim)`` marks the set as heads;
  ``q @ k^T``, ``attn @ v`` and ``scaled_dot_product_attention`` couple q, k and v on the heads
  dim (and q with k on ``head_dim``).

Sets that must be pruned in whole blocks get an ``internal_metric_block``: ``head_dim`` for
attention heads, ``channels // groups`` for ``GroupNorm`` and for grouped convs (whole groups,
so the conv stays a grouped conv). When several blocks apply, their least common multiple is
used.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch
import torch.nn as nn

from .canonical import TargetRecord, canonicalize
from .errors import CompressError, ConfigError
from .graph import ModuleGraph, NodeRef, OpNode, capture_and_analyse

__all__ = ["ChannelGroup", "auto_set_dependency_group_ids", "find_channel_groups"]

# (dim, set id, kind); kind "c" = a whole channel dim, "h" = the heads part of a split channel
# dim, "d" = its head_dim part.
Axis = tuple[int, int, str]

_PRODUCERS = (nn.Linear, nn.Embedding, nn.modules.conv._ConvNd)

_SELECTION_KEYS = (
    "op_names",
    "op_names_re",
    "op_types",
    "exclude_op_names",
    "exclude_op_names_re",
    "exclude_op_types",
)

# Ops that keep every dim where it is; dims whose size changes lose their channel set.
_SAME_DIMS = frozenset(
    {
        "dropout", "feature_dropout", "alpha_dropout", "native_dropout",
        "softmax", "_softmax", "log_softmax", "_log_softmax",
        "to", "_to_copy", "type_as", "contiguous", "clone", "detach", "alias", "lift_fresh_copy",
        "float", "half", "double", "bfloat16", "type",
        "batch_norm", "native_batch_norm", "_native_batch_norm_legit_no_training",
        "_native_batch_norm_legit_functional", "_native_batch_norm_legit",
        "layer_norm", "native_layer_norm", "group_norm", "native_group_norm", "rms_norm",
        "max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices",
        "max_pool3d_with_indices", "avg_pool1d", "avg_pool2d", "avg_pool3d",
        "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
        "_adaptive_avg_pool2d", "adaptive_max_pool1d", "adaptive_max_pool2d",
        "upsample_nearest2d", "upsample_bilinear2d", "constant_pad_nd", "pad",
        "cumsum", "flip", "roll", "data",
    }
)
# Elementwise ops, for the fallback tracer's torch functions and methods (export's ATen ops
# carry torch.Tag.pointwise instead).
_ELEMENTWISE = frozenset(
    {
        "add", "sub", "rsub", "mul", "div", "where", "maximum", "minimum", "pow", "masked_fill",
        "relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardtanh", "hardswish",
        "hardsigmoid", "leaky_relu", "elu", "selu", "mish", "softplus", "abs", "neg", "exp",
        "log", "sqrt", "rsqrt", "erf", "clamp", "clip", "square", "reciprocal", "sin", "cos",
        "sign", "eq", "ne", "gt", "lt", "ge", "le", "and", "or", "xor", "invert",
        "logical_not", "floor_divide", "remainder", "mod", "addcmul", "lerp",
    }
)
_VIEWS = frozenset(
    {"view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as",
     "reshape_as"}
)
_REDUCTIONS = frozenset({"mean", "sum", "amax", "amin", "max", "min", "std", "var", "prod", "logsumexp", "norm"})
_MATMULS = frozenset({"matmul", "bmm", "mm"})
_NORM_MEMBERS = frozenset(
    {"batch_norm", "native_batch_norm", "_native_batch_norm_legit_no_training",
     "_native_batch_norm_legit_functional", "_native_batch_norm_legit",
     "group_norm", "native_group_norm", "layer_norm", "native_layer_norm", "rms_norm"}
)


@attrs.frozen
class ChannelGroup:
    """Modules whose output channels are coupled.

    :ivar modules: every coupled module (producers and per-channel norms), in graph order.
    :ivar channels: the number of coupled channels.
    :ivar internal_metric_block: the block whole multiples of which must be pruned, or ``None``.
    """

    modules: tuple[str, ...]
    channels: int
    internal_metric_block: int | None


@attrs.define
class _Analysis:
    graph: ModuleGraph
    parent: list[int] = attrs.Factory(list)
    channels: list[int] = attrs.Factory(list)
    blocks: dict[int, set[int]] = attrs.Factory(dict)
    members: list[tuple[int, str]] = attrs.Factory(list)
    set_of_module: dict[str, int] = attrs.Factory(dict)
    tags: dict[str, tuple[Axis, ...]] = attrs.Factory(dict)
    multi: dict[str, list[tuple[Axis, ...]]] = attrs.Factory(dict)
    untracked: list[str] = attrs.Factory(list)

    # -- union-find ---------------------------------------------------------------------------

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if rb < ra:
            ra, rb = rb, ra  # the older set is the root, so group order follows the graph
        self.parent[rb] = ra
        self.blocks.setdefault(ra, set()).update(self.blocks.pop(rb, set()))
        return ra

    def producer_set(self, module: str, channels: int) -> int:
        if module in self.set_of_module:  # a module called twice produces the same channels
            return self.set_of_module[module]
        s = len(self.parent)
        self.parent.append(s)
        self.channels.append(channels)
        self.set_of_module[module] = s
        self.members.append((s, module))
        return s

    def demand_block(self, s: int, block: int) -> None:
        if block > 1:
            self.blocks.setdefault(self.find(s), set()).add(block)

    # -- helpers ------------------------------------------------------------------------------

    def node(self, value: Any) -> OpNode | None:
        return self.graph.nodes[value.name] if isinstance(value, NodeRef) else None

    def axes_of(self, value: Any) -> tuple[Axis, ...]:
        return self.tags.get(value.name, ()) if isinstance(value, NodeRef) else ()

    def shape_of(self, value: Any) -> tuple[int, ...] | None:
        n = self.node(value)
        return n.shape if n is not None else None

    # -- the walk -----------------------------------------------------------------------------

    def run(self) -> None:
        for node in self.graph.calls():
            out = self.visit(node)
            if out:
                self.tags[node.name] = tuple(out)

    def visit(self, node: OpNode) -> list[Axis] | None:
        op = node.op
        x = node.args[0] if node.args else None
        tagged_inputs = any(self.tags.get(name) for name in node.inputs) or any(
            any(t) for name in node.inputs for t in self.multi.get(name, ())
        )
        if op == "getitem":
            source = self.node(x)
            index = node.args[1]
            if source is not None and source.name in self.multi and isinstance(index, int):
                outs = self.multi[source.name]
                return list(outs[index]) if index < len(outs) else None
            if not tagged_inputs:
                return None
        if op in ("linear", "embedding") or op.startswith(("conv1d", "conv2d", "conv3d", "convolution", "conv_transpose")):
            return self.producer(node)
        if op in _NORM_MEMBERS:
            self.norm_member(node)
        if op in _SAME_DIMS:
            return self.same_dims(node)
        if self.is_elementwise(node):
            return self.elementwise(node)
        if op in _VIEWS:
            return self.view(node)
        if op in ("permute", "transpose", "t", "swapaxes", "mT"):
            return self.permute(node)
        if op in ("expand", "expand_as", "broadcast_to"):
            return self.expand(node)
        if op == "index":
            return self.index(node)
        if op in _REDUCTIONS:
            return self.reduce(node)
        if op in ("cat", "concat", "concatenate", "stack"):
            return self.cat(node)
        if op in _MATMULS:
            return self.matmul(node)
        if op == "scaled_dot_product_attention":
            return self.sdpa(node)
        if op in ("select", "slice", "index_select", "narrow"):
            return self.select(node)
        if op in ("split", "split_with_sizes", "chunk", "unbind", "tensor_split"):
            self.split(node)
            return None
        if tagged_inputs:
            self.untracked.append(f"{node.name} ({op})")
        return None

    def is_elementwise(self, node: OpNode) -> bool:
        if isinstance(node.target, torch._ops.OpOverload):
            return torch.Tag.pointwise in node.target.tags
        return node.op in _ELEMENTWISE

    def producer(self, node: OpNode) -> list[Axis] | None:
        if node.weight_of is None or node.shape is None:
            if any(self.tags.get(n) for n in node.inputs):
                self.untracked.append(f"{node.name} ({node.op} without a module weight)")
            return None
        module = self.graph.modules[node.weight_of]
        if not isinstance(module, _PRODUCERS):
            return None
        out_ndim = len(node.shape)
        if isinstance(module, nn.modules.conv._ConvNd):
            dim = 1 if out_ndim == module.weight.dim() else 0
            s = self.producer_set(node.weight_of, node.shape[dim])
            self.conv_input(node, module, s, dim)
            return [(dim, s, "c")]
        s = self.producer_set(node.weight_of, node.shape[-1])
        return [(out_ndim - 1, s, "c")]

    def conv_input(self, node: OpNode, conv: nn.modules.conv._ConvNd, s: int, dim: int) -> None:
        groups = conv.groups
        if groups == 1:
            return
        cin, cout = conv.in_channels, conv.out_channels
        inputs = [a for a in self.axes_of(node.args[0]) if a[0] == dim and a[2] == "c"]
        if cin == cout:
            # Channel i of each group reads input channels of group i only: equal group
            # sizes on both sides keep a one-to-one channel map (depthwise: one channel each).
            for _, other, _ in inputs:
                self.union(other, s)
            self.demand_block(s, cin // groups)
        else:
            # Whole groups on both sides keep it a grouped conv; the two sides have different
            # group sizes, which one dependency group cannot express, so they stay separate.
            self.demand_block(s, cout // groups)
            for _, other, _ in inputs:
                self.demand_block(other, cin // groups)

    def norm_member(self, node: OpNode) -> None:
        axes = self.axes_of(node.args[0])
        shape = self.shape_of(node.args[0])
        if not axes or shape is None:
            return
        if node.op in ("layer_norm", "native_layer_norm", "rms_norm"):
            dim = len(shape) - 1
        else:
            dim = 1 if len(shape) > 1 else 0
        hits = [a for a in axes if a[0] == dim and a[2] == "c"]
        if not hits:
            return
        s = hits[0][1]
        if node.op in ("group_norm", "native_group_norm"):
            groups = node.args[1] if node.op == "group_norm" else node.args[6]
            if node.weight_of is not None and isinstance(self.graph.modules.get(node.weight_of), nn.GroupNorm):
                groups = self.graph.modules[node.weight_of].num_groups
            if isinstance(groups, int) and groups > 0:
                self.demand_block(s, shape[dim] // groups)
        if node.weight_of is not None:
            self.members.append((s, node.weight_of))

    def same_dims(self, node: OpNode) -> list[Axis] | None:
        x = node.args[0] if node.args else None
        in_shape, out_shape = self.shape_of(x), node.shape
        axes = self.axes_of(x)
        if not axes or in_shape is None:
            return None
        if out_shape is None and node.shapes:
            out_shape = node.shapes[0]
            kept = [a for a in axes if out_shape is not None and len(out_shape) == len(in_shape) and out_shape[a[0]] == in_shape[a[0]]]
            self.multi[node.name] = [tuple(kept)] + [()] * (len(node.shapes) - 1)
            return None
        if out_shape is None or len(out_shape) != len(in_shape):
            self.untracked.append(f"{node.name} ({node.op})")
            return None
        return [a for a in axes if out_shape[a[0]] == in_shape[a[0]]]

    def elementwise(self, node: OpNode) -> list[Axis] | None:
        out_shape = node.shape
        if out_shape is None:
            return None
        by_dim: dict[int, list[tuple[int, str]]] = {}
        values = list(node.args) + list(node.kwargs.values())
        for value in values:
            shape = self.shape_of(value)
            if shape is None:
                continue
            offset = len(out_shape) - len(shape)
            for d, s, kind in self.axes_of(value):
                od = d + offset
                if shape[d] == out_shape[od]:
                    by_dim.setdefault(od, []).append((s, kind))
        result = []
        for od, found in sorted(by_dim.items()):
            s0, kind0 = found[0]
            for s, _ in found[1:]:
                self.union(s0, s)
            result.append((od, s0, kind0))
        return result

    def view(self, node: OpNode) -> list[Axis] | None:
        x = node.args[0]
        in_shape, out_shape, axes = self.shape_of(x), node.shape, self.axes_of(x)
        if not axes:
            return None
        if in_shape is None or out_shape is None:
            self.untracked.append(f"{node.name} ({node.op})")
            return None
        by_dim = {a[0]: a for a in axes}
        prefix_out = [math.prod(out_shape[:j]) for j in range(len(out_shape) + 1)]
        result: list[Axis] = []
        done: set[int] = set()

        def find_j(before: int, size: int, after: int) -> int | None:
            found = [j for j in range(len(out_shape)) if prefix_out[j] == before and out_shape[j] == size]
            exact = [j for j in found if math.prod(out_shape[j + 1:]) == after]
            candidates = exact or found
            return candidates[0] if candidates else None

        for d in sorted(by_dim):
            if d in done:
                continue
            _, s, kind = by_dim[d]
            before = math.prod(in_shape[:d])
            nxt = by_dim.get(d + 1)
            if kind == "h" and nxt is not None and nxt[2] == "d" and self.find(nxt[1]) == self.find(s):
                j = find_j(before, in_shape[d] * in_shape[d + 1], math.prod(in_shape[d + 2:]))
                if j is not None:
                    result.append((j, s, "c"))
                    done.update((d, d + 1))
                    continue
            j = find_j(before, in_shape[d], math.prod(in_shape[d + 1:]))
            if j is not None:
                result.append((j, s, kind))
                continue
            if kind == "c":
                size = in_shape[d]
                for j in range(len(out_shape) - 1):
                    if prefix_out[j] == before and out_shape[j] > 1 and out_shape[j + 1] > 1 and out_shape[j] * out_shape[j + 1] == size:
                        # Channels split into (heads, head_dim): heads are pruned whole.
                        result += [(j, s, "h"), (j + 1, s, "d")]
                        self.demand_block(s, out_shape[j + 1])
                        break
        return result

    def permute(self, node: OpNode) -> list[Axis] | None:
        x = node.args[0]
        axes, shape = self.axes_of(x), self.shape_of(x)
        if not axes or shape is None:
            return None
        ndim = len(shape)
        if node.op == "permute":
            dims = node.args[1:] if len(node.args) > 1 else node.kwargs["dims"]
            if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
                dims = dims[0]  # x.permute([0, 2, 1]) as well as x.permute(0, 2, 1)
            order = [d % ndim for d in dims]
            return [(order.index(d), s, k) for d, s, k in axes]
        if node.op == "t":
            d0, d1 = 0, 1 if ndim > 1 else 0
        elif node.op == "mT":
            d0, d1 = ndim - 2, ndim - 1
        else:
            d0, d1 = node.args[1] % ndim, node.args[2] % ndim
        swap = {d0: d1, d1: d0}
        return [(swap.get(d, d), s, k) for d, s, k in axes]

    def expand(self, node: OpNode) -> list[Axis] | None:
        x = node.args[0]
        axes, in_shape, out_shape = self.axes_of(x), self.shape_of(x), node.shape
        if not axes or in_shape is None or out_shape is None:
            return None
        offset = len(out_shape) - len(in_shape)  # broadcasting aligns dims from the right
        return [(d + offset, s, k) for d, s, k in axes if out_shape[d + offset] == in_shape[d]]

    def index(self, node: OpNode) -> list[Axis] | None:
        """``x[...]`` as recorded by the eager tracer: ints, slices, ``None`` and ``...``."""
        x = node.args[0]
        axes, in_shape, out_shape = self.axes_of(x), self.shape_of(x), node.shape
        if not axes or in_shape is None or out_shape is None:
            return None
        items = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        if any(not (i is None or i is Ellipsis or isinstance(i, (int, slice))) for i in items):
            self.untracked.append(f"{node.name} (advanced indexing)")
            return None
        explicit = sum(1 for i in items if i is not None and i is not Ellipsis)
        expanded: list[Any] = []
        for item in items:
            if item is Ellipsis:
                expanded += [slice(None)] * (len(in_shape) - explicit)
            else:
                expanded.append(item)
        expanded += [slice(None)] * (len(in_shape) - sum(1 for i in expanded if i is not None))
        mapping: dict[int, int] = {}
        d = o = 0
        for item in expanded:
            if item is None:
                o += 1
            elif isinstance(item, int):
                d += 1
            else:
                if out_shape[o] == in_shape[d]:
                    mapping[d] = o
                d += 1
                o += 1
        return [(mapping[d], s, k) for d, s, k in axes if d in mapping]

    def reduce(self, node: OpNode) -> list[Axis] | None:
        x = node.args[0]
        axes, shape = self.axes_of(x), self.shape_of(x)
        if not axes or shape is None:
            return None
        ndim = len(shape)
        dims = self.graph.arg(node, 1, "dim")
        if dims is None or dims == [] or isinstance(dims, torch.dtype):
            dims = list(range(ndim))
        elif isinstance(dims, int):
            dims = [dims]
        reduced = {d % ndim for d in dims}
        out_shape = node.shape if node.shape is not None else (node.shapes[0] if node.shapes else None)
        keepdim = out_shape is not None and len(out_shape) == ndim
        result = []
        for d, s, k in axes:
            if d in reduced:
                continue
            result.append((d if keepdim else d - sum(1 for r in reduced if r < d), s, k))
        if node.shape is None and node.shapes:
            self.multi[node.name] = [tuple(result)] * len(node.shapes)
            return None
        return result

    def cat(self, node: OpNode) -> list[Axis] | None:
        tensors = node.args[0]
        dim = self.graph.arg(node, 1, "dim", 0)
        out_shape = node.shape
        if out_shape is None:
            return None
        stack = node.op == "stack"
        ndim_out = len(out_shape)
        dim %= ndim_out
        by_dim: dict[int, list[tuple[int, str]]] = {}
        for value in tensors:
            for d, s, k in self.axes_of(value):
                od = d + (1 if stack and d >= dim else 0)
                if not stack and od == dim:
                    continue  # channels concatenated, not shared
                by_dim.setdefault(od, []).append((s, k))
        result = []
        for od, found in sorted(by_dim.items()):
            for s, _ in found[1:]:
                self.union(found[0][0], s)
            result.append((od, found[0][0], found[0][1]))
        return result

    def matmul(self, node: OpNode) -> list[Axis] | None:
        a, b = node.args[0], node.args[1]
        sa, sb, out = self.shape_of(a), self.shape_of(b), node.shape
        if sa is None or sb is None or out is None or len(sa) < 2 or len(sb) < 2:
            if self.axes_of(a) or self.axes_of(b):
                self.untracked.append(f"{node.name} ({node.op})")
            return None
        by_dim: dict[int, list[tuple[int, str]]] = {}
        contracted: list[int] = []
        for shape, axes, row_or_col, contract in ((sa, self.axes_of(a), len(sa) - 2, len(sa) - 1),
                                                   (sb, self.axes_of(b), len(sb) - 1, len(sb) - 2)):
            for d, s, k in axes:
                if d == contract:
                    contracted.append(s)
                    continue
                if d == row_or_col:
                    od = len(out) - (2 if shape is sa else 1)
                else:
                    od = d + len(out) - len(shape)
                    if shape[d] != out[od]:
                        continue
                by_dim.setdefault(od, []).append((s, k))
        if len(contracted) == 2:
            self.union(*contracted)
        result = []
        for od, found in sorted(by_dim.items()):
            for s, _ in found[1:]:
                self.union(found[0][0], s)
            result.append((od, found[0][0], found[0][1]))
        return result

    def sdpa(self, node: OpNode) -> list[Axis] | None:
        q, k, v = node.args[0], node.args[1], node.args[2]
        shape = self.shape_of(q)
        if shape is None or len(shape) < 3:
            return None
        ndim = len(shape)
        heads = [s for value in (q, k, v) for d, s, _ in self.axes_of(value) if d == ndim - 3]
        for s in heads[1:]:
            self.union(heads[0], s)
        dims = [s for value in (q, k) for d, s, _ in self.axes_of(value) if d == ndim - 1]
        for s in dims[1:]:
            self.union(dims[0], s)
        result = [a for a in self.axes_of(q) if a[0] == ndim - 3]
        result += [a for a in self.axes_of(v) if a[0] == ndim - 1]
        return result

    def select(self, node: OpNode) -> list[Axis] | None:
        x = node.args[0]
        axes, in_shape, out_shape = self.axes_of(x), self.shape_of(x), node.shape
        if not axes or in_shape is None or out_shape is None:
            return None
        dim = self.graph.arg(node, 1, "dim", 0) % len(in_shape)
        removed = len(out_shape) < len(in_shape)
        result = []
        for d, s, k in axes:
            if d == dim:
                continue  # some channels taken: no longer the producer's full channel set
            result.append((d - 1 if removed and d > dim else d, s, k))
        return result

    def split(self, node: OpNode) -> None:
        x = node.args[0]
        axes, in_shape = self.axes_of(x), self.shape_of(x)
        if not axes or in_shape is None or not node.shapes:
            return
        dim = self.graph.arg(node, 2, "dim", 0) if node.op != "unbind" else self.graph.arg(node, 1, "dim", 0)
        dim %= len(in_shape)
        removed = node.op == "unbind"
        kept = tuple((d - 1 if removed and d > dim else d, s, k) for d, s, k in axes if d != dim)
        self.multi[node.name] = [kept] * len(node.shapes)

    # -- results ------------------------------------------------------------------------------

    def groups(self) -> list[ChannelGroup]:
        by_root: dict[int, list[str]] = {}
        for s, module in self.members:
            names = by_root.setdefault(self.find(s), [])
            if module not in names:
                names.append(module)
        result = []
        for root, names in by_root.items():
            blocks = self.blocks.get(root, set())
            block = math.lcm(*blocks) if blocks else None
            result.append(ChannelGroup(modules=tuple(names), channels=self.channels[root], internal_metric_block=block))
        return result


def find_channel_groups(
    model: nn.Module,
    example_inputs: tuple[Any, ...],
    *,
    graph: ModuleGraph | None = None,
    capture_method: str = "auto",
) -> tuple[list[ChannelGroup], list[str]]:
    """Every set of coupled output channels of ``model``, selected or not.

    :param graph: a graph captured earlier by :func:`compress_core.graph.capture`.
    :param capture_method: how to capture it otherwise: ``"auto"`` (the eager capture, or
        ``torch.export`` when the eager forward raises or its graph has any op the analysis
        cannot follow), ``"eager"`` or ``"export"``; see
        :func:`compress_core.graph.capture_and_analyse`.
    :returns: the groups in graph order (single modules included), and the ops the analysis
        could not follow channels through (``"node_name (op)"``); channels reaching those are
        not coupled further.
    """

    def analyse(captured: ModuleGraph, last: bool) -> tuple[list[ChannelGroup], list[str]] | None:
        analysis = _Analysis(captured)
        analysis.run()
        if analysis.untracked and not last:
            return None
        return analysis.groups(), analysis.untracked

    if graph is not None:
        result = analyse(graph, True)
        assert result is not None  # last=True always gives one
        return result
    return capture_and_analyse(model, example_inputs, capture_method, analyse)


def auto_set_dependency_group_ids(
    model: nn.Module,
    config_list: Sequence[Mapping[str, Any]],
    example_inputs: tuple[Any, ...],
    *,
    capture_method: str = "auto",
) -> list[dict[str, Any]]:
    """Return a new pruning config list with ``dependency_group_id`` set for coupled modules.

    Modules whose ``weight`` is a pruning target of ``config_list`` (without ``align`` and
    without a ``dependency_group_id`` of the user's own) get an id when at least two of them
    are coupled, or when one alone must be pruned in blocks (``internal_metric_block``). Each
    such module gets its own entry ``{"op_names": [name], ...}`` with every setting of the entry
    that selected it, the id (``"dep0"``, ``"dep1"``, ... in graph order) and the block in
    ``target_settings.weight``; these entries come right before that entry, which excludes them
    through ``exclude_op_names`` (or disappears if nothing else is left to it). ``Embedding``
    and ``ConvTranspose*`` members with ``granularity`` ``out_channel`` or ``default`` get
    ``in_channel``: their output channels are weight dim 1. ``config_list`` itself is not changed.

    :param example_inputs: a tuple of positional arguments, as for ``torch.export``.
    :param capture_method: ``"auto"`` (the default: the eager capture, falling back to
        ``torch.export`` when the eager forward raises or leaves ops the analysis cannot follow),
        ``"export"`` (``torch.export``, falling back to ``torch.fx.symbolic_trace``) or
        ``"eager"`` (one recorded forward pass: several times faster); see
        :func:`compress_core.graph.capture_and_analyse`.
    :raises ConfigError: for an invalid config list, or when coupled modules are given
        different ``sparse_ratio``/``sparse_threshold``/``global_group_id``.
    :raises CompressError: when the model's graph cannot be captured.
    """
    with warnings.catch_warnings():
        # The same warnings come again when the returned list is used; say them once.
        warnings.simplefilter("ignore")
        records = canonicalize(model, config_list, "pruning")
    weights: dict[str, TargetRecord] = {
        r.module_name: r
        for r in records
        if r.target_name == "weight" and r.settings.align is None and r.settings.dependency_group_id is None
    }
    groups, _ = find_channel_groups(model, example_inputs, capture_method=capture_method)
    modules = dict(model.named_modules())

    assigned: dict[str, tuple[str, int | None]] = {}
    for group in groups:
        selected = [m for m in group.modules if m in weights]
        if not selected or (len(selected) == 1 and group.internal_metric_block is None):
            continue
        _check_consistent(selected, weights)
        if group.internal_metric_block is not None and group.channels % group.internal_metric_block:
            raise CompressError(
                f"modules {', '.join(selected)} must be pruned in blocks of {group.internal_metric_block} "
                f"channels, which does not divide their {group.channels} channels"
            )
        group_id = f"dep{len({gid for gid, _ in assigned.values()})}"
        for name in selected:
            assigned[name] = (group_id, group.internal_metric_block)

    by_entry: dict[int, list[str]] = {}
    configured: dict[int, set[str]] = {}
    for r in records:
        configured.setdefault(r.entry, set()).add(r.module_name)
    for name, record in weights.items():
        if name in assigned:
            by_entry.setdefault(record.entry, []).append(name)

    result: list[dict[str, Any]] = []
    for index, original in enumerate(config_list):
        entry: dict[str, Any] = copy.deepcopy(dict(original))
        split = by_entry.get(index, [])
        for name in split:
            group_id, block = assigned[name]
            new = {k: v for k, v in copy.deepcopy(entry).items() if k not in _SELECTION_KEYS}
            new["op_names"] = [name]
            target_settings = dict(new.get("target_settings") or {})
            weight = dict(target_settings.get("weight") or {})
            weight["dependency_group_id"] = group_id
            if block is not None:
                weight["internal_metric_block"] = block
            module = modules[name]
            if isinstance(module, (nn.Embedding, nn.modules.conv._ConvTransposeNd)) and weights[name].settings.granularity in (
                "out_channel",
                "default",  # out_channel for the norm pruners: the rows, never the channels here
            ):
                weight["granularity"] = "in_channel"
            target_settings["weight"] = weight
            new["target_settings"] = target_settings
            result.append(new)
        if split and configured.get(index, set()) <= set(split):
            continue  # everything it configured moved to the entries above
        if split:
            entry["exclude_op_names"] = list(entry.get("exclude_op_names") or []) + split
        result.append(entry)
    return result


def _check_consistent(selected: list[str], weights: Mapping[str, TargetRecord]) -> None:
    first = weights[selected[0]]
    for name in selected[1:]:
        record = weights[name]
        for key in ("sparse_ratio", "sparse_threshold", "global_group_id"):
            a, b = getattr(first.settings, key), getattr(record.settings, key)
            if a != b:
                raise ConfigError(
                    f"'{first.module_name}' (config_list[{first.entry}]) and '{record.module_name}' "
                    f"(config_list[{record.entry}]) are coupled (their output channels must be pruned "
                    f"at the same positions) but {key} differs: {a!r} vs {b!r}; give coupled modules "
                    "the same value",
                    entry=record.entry,
                    key=key,
                    module=record.module_name,
                )
