"""Pure mask math shared by every pruning algorithm.

Masks are ``bool`` tensors: ``True`` keeps an element, ``False`` prunes it. A *block* is the set
of tensor elements that share one metric value and are pruned together; the *grid* is the tensor
of per-block metrics (or per-block mask values).

This module depends only on torch, math and attrs so that every algorithm (and its tests) can use
it without pulling in the rest of compress-core. Nothing here assumes a device: every tensor is
created on the device of the tensor it is derived from.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Hashable, Sequence
from typing import TypeGuard, Union

import attrs
import torch
from torch import Tensor

__all__ = [
    "MASK_ADD_VALUE",
    "Granularity",
    "MaskRequest",
    "align_mask",
    "apply_mask",
    "block_reduce",
    "block_shape",
    "expand_mask",
    "solve_masks",
]

#: Added to pruned positions by ``apply_mask(..., "add")``; large enough to vanish after Softmax.
MASK_ADD_VALUE = -1000.0

Granularity = Union[str, Sequence[int]]

_PARAM_GRANULARITIES = ("element", "out_channel", "in_channel")
_ACTIVATION_GRANULARITIES = ("element", "per_channel")
_REDUCES = ("sum", "mean", "max", "l2")
_APPLY_METHODS = ("mul", "add")

# Counts come from products like 0.7 * 10 == 6.999999999999999; the epsilon absorbs that rounding.
# It grows with the magnitude because a double's rounding error does (n * r for n ~ 1e7).
_EPS = 1e-9


def _floor(x: float) -> int:
    return math.floor(x + max(_EPS, abs(x) * 1e-15))


def _ceil(x: float) -> int:
    return math.ceil(x - max(_EPS, abs(x) * 1e-15))


def _fmt_shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _is_int(x: object) -> bool:
    # bool is an int subclass but `True` as a block size is almost certainly a mistake.
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: object) -> TypeGuard[numbers.Real]:
    # numbers.Real also admits numpy scalars, which configs built with numpy tend to carry.
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


# --------------------------------------------------------------------------------------------
# Granularity -> block shape
# --------------------------------------------------------------------------------------------


def block_shape(
    granularity: Granularity, shape: tuple[int, ...], *, activation: bool = False
) -> tuple[int, ...]:
    """Resolve ``granularity`` into a block shape with one entry per dim of ``shape``.

    :param granularity: ``"element"``; ``"out_channel"`` / ``"in_channel"`` (parameters only);
        ``"per_channel"`` (inputs/outputs only: one block per index of the last dim); or a
        list/tuple of block sizes over the trailing dims, where ``-1`` means the whole dim and
        uncovered leading dims get 1.
    :param shape: shape of the tensor the blocks tile.
    :param activation: ``True`` for inputs/outputs, ``False`` for parameters.
    :returns: the block shape; every entry divides the matching dim of ``shape``.
    :raises ValueError: for an unknown granularity, one that does not fit the tensor kind, or
        block sizes that do not tile ``shape``.
    """
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    # A zero-sized dim still gets a block size of 1 so that grid sizes never divide by zero.
    whole = [max(s, 1) for s in shape]
    kind = "inputs/outputs" if activation else "parameters"

    if isinstance(granularity, str):
        if granularity == "element":
            return (1,) * ndim
        if granularity in ("out_channel", "in_channel"):
            if activation:
                raise ValueError(
                    f"'{granularity}' is for parameters; use 'per_channel' for inputs/outputs"
                )
            if granularity == "out_channel":
                if ndim == 0:
                    raise ValueError(
                        "'out_channel' needs a parameter with at least 1 dim; got shape ()"
                    )
                return (1, *whole[1:])
            if ndim < 2:
                raise ValueError(
                    "'in_channel' needs a parameter with at least 2 dims; "
                    f"got shape {_fmt_shape(shape)}"
                )
            return (whole[0], 1, *whole[2:])
        if granularity == "per_channel":
            if not activation:
                raise ValueError(
                    "'per_channel' is for inputs/outputs; use 'out_channel' (dim 0) or "
                    "'in_channel' (dim 1) for parameters"
                )
            if ndim == 0:
                raise ValueError("'per_channel' needs a tensor with at least 1 dim; got shape ()")
            return (*whole[:-1], 1)
        allowed = _ACTIVATION_GRANULARITIES if activation else _PARAM_GRANULARITIES
        raise ValueError(
            f"unknown granularity {granularity!r} for {kind}; expected one of "
            f"{', '.join(repr(a) for a in allowed)} or a list of block sizes"
        )

    if not isinstance(granularity, (list, tuple)):
        raise ValueError(
            f"granularity must be a string or a list of ints; got {type(granularity).__name__}"
        )
    sizes = list(granularity)
    if len(sizes) > ndim:
        raise ValueError(
            f"block {list(sizes)} has {len(sizes)} dims but the tensor has only {ndim} "
            f"(shape {_fmt_shape(shape)})"
        )
    block = [1] * (ndim - len(sizes))
    for offset, b in enumerate(sizes):
        dim = ndim - len(sizes) + offset
        if not _is_int(b):
            raise ValueError(f"block sizes must be ints; got {b!r} for dim {dim}")
        if b == -1:
            block.append(whole[dim])
            continue
        if b < 1:
            raise ValueError(f"block size {b} for dim {dim} must be >= 1 (or -1 for the whole dim)")
        if shape[dim] % b != 0:
            raise ValueError(f"block size {b} does not divide dim {dim} of size {shape[dim]}")
        block.append(b)
    return tuple(block)


def _check_block(block: Sequence[int], shape: Sequence[int], what: str) -> tuple[int, ...]:
    block = tuple(int(b) for b in block)
    if len(block) != len(shape):
        raise ValueError(
            f"block {_fmt_shape(block)} has {len(block)} dims but {what} has shape "
            f"{_fmt_shape(shape)}"
        )
    for dim, (s, b) in enumerate(zip(shape, block)):
        if b < 1:
            raise ValueError(f"block size {b} for dim {dim} must be >= 1")
        if s % b != 0:
            raise ValueError(f"block size {b} does not divide dim {dim} of size {s}")
    return block


# --------------------------------------------------------------------------------------------
# Blocks <-> grid
# --------------------------------------------------------------------------------------------


def block_reduce(t: Tensor, block: tuple[int, ...], reduce: str = "sum") -> Tensor:
    """Reduce every block of ``t`` to one value.

    :param t: the tensor to reduce (usually a per-element metric).
    :param block: block shape, one entry per dim of ``t``, each dividing its dim.
    :param reduce: ``"sum"``, ``"mean"``, ``"max"`` or ``"l2"`` (square root of the sum of squares).
    :returns: the grid, of shape ``tuple(s // b for s, b in zip(t.shape, block))``. For an all-ones
        block this is ``t`` itself (``t.abs()`` for ``"l2"``), not a copy.
    """
    if reduce not in _REDUCES:
        raise ValueError(f"unknown reduce {reduce!r}; expected one of {', '.join(_REDUCES)}")
    block = _check_block(block, t.shape, "the tensor")
    if all(b == 1 for b in block):
        return t.abs() if reduce == "l2" else t

    # Split each blocked dim s into (s // b, b): for a row-major tensor that is a pure view, and
    # the block members then sit on the inserted dims, so one multi-dim reduction does it all.
    split: list[int] = []
    reduce_dims: list[int] = []
    for s, b in zip(t.shape, block):
        if b == 1:
            split.append(s)
        else:
            split.extend((s // b, b))
            reduce_dims.append(len(split) - 1)
    blocks = t.reshape(split)
    dims = tuple(reduce_dims)
    if reduce == "sum":
        return blocks.sum(dim=dims)
    if reduce == "mean":
        return blocks.mean(dim=dims)
    if reduce == "max":
        return blocks.amax(dim=dims)
    return torch.linalg.vector_norm(blocks, ord=2, dim=dims)


def expand_mask(grid_mask: Tensor, block: tuple[int, ...], shape: tuple[int, ...]) -> Tensor:
    """Turn a grid mask back into a compact ``bool`` mask that broadcasts to ``shape``.

    Dims whose block covers the whole dim stay size 1, dims with block 1 keep their size, and
    dims with a block in between are expanded with ``repeat_interleave``. E.g. an ``out_channel``
    mask for a ``(16, 8, 3, 3)`` weight comes back as ``(16, 1, 1, 1)``.

    :param grid_mask: mask over the grid, shape ``tuple(s // b for s, b in zip(shape, block))``.
    :param block: the block shape the grid was built with.
    :param shape: shape of the full tensor.
    :returns: a ``bool`` mask that broadcasts to ``shape`` and equals the full mask.
    """
    shape = tuple(int(s) for s in shape)
    block = _check_block(block, shape, "the target")
    grid = tuple(s // b for s, b in zip(shape, block))
    if tuple(grid_mask.shape) != grid:
        raise ValueError(
            f"grid mask has shape {_fmt_shape(grid_mask.shape)} but block {_fmt_shape(block)} "
            f"on shape {_fmt_shape(shape)} gives a grid of {_fmt_shape(grid)}"
        )
    mask = grid_mask if grid_mask.dtype == torch.bool else grid_mask.to(torch.bool)
    for dim, (s, b) in enumerate(zip(shape, block)):
        if 1 < b < s:
            mask = mask.repeat_interleave(b, dim=dim)
    return mask


# --------------------------------------------------------------------------------------------
# Mask requests and the solver
# --------------------------------------------------------------------------------------------


def _check_ratio(key: Hashable, name: str, value: object) -> None:
    if value is None:
        return
    if not _is_real(value) or not 0.0 <= float(value) <= 1.0:  # also rejects NaN
        raise ValueError(f"request {key!r}: {name} must be a number in [0, 1]; got {value!r}")


@attrs.frozen(kw_only=True)
class MaskRequest:
    """One target for :func:`solve_masks`.

    :ivar key: hashable identifying the target; the key of its mask in the result.
    :ivar metric: the metric grid, floating point; higher means more important.
    :ivar block_numel: tensor elements per grid cell, so that global ratios count elements.
    :ivar sparse_ratio: fraction of cells to prune (exclusive with ``sparse_threshold``).
    :ivar sparse_threshold: prune cells whose metric is below this value.
    :ivar min_sparse_ratio: lower bound on the fraction of pruned cells.
    :ivar max_sparse_ratio: upper bound on the fraction of pruned cells.
    :ivar global_group_id: requests sharing it are ranked together under one element budget.
    :ivar dependency_group_id: requests sharing it get one mask, solved on their mean metric.
    :ivar internal_metric_block: on a 1-D grid, consecutive chunks of this many cells are kept or
        pruned together (e.g. attention heads).
    """

    key: Hashable
    # Tensors compare element-wise, so equality uses torch.equal and the hash leaves them out.
    metric: Tensor = attrs.field(eq=attrs.cmp_using(eq=torch.equal), hash=False)
    block_numel: int = 1
    sparse_ratio: float | None = None
    sparse_threshold: float | None = None
    min_sparse_ratio: float | None = None
    max_sparse_ratio: float | None = None
    global_group_id: Hashable | None = None
    dependency_group_id: Hashable | None = None
    internal_metric_block: int | None = None

    def __attrs_post_init__(self) -> None:
        key = self.key
        try:
            hash(key)
        except TypeError:
            raise ValueError(f"request key must be hashable; got {type(key).__name__}") from None
        if not isinstance(self.metric, Tensor):
            raise ValueError(
                f"request {key!r}: metric must be a torch.Tensor; got {type(self.metric).__name__}"
            )
        if not self.metric.is_floating_point():
            raise ValueError(
                f"request {key!r}: metric must be floating point; got {self.metric.dtype}"
            )
        if not _is_int(self.block_numel) or self.block_numel < 1:
            raise ValueError(
                f"request {key!r}: block_numel must be an int >= 1; got {self.block_numel!r}"
            )
        if (self.sparse_ratio is None) == (self.sparse_threshold is None):
            raise ValueError(
                f"request {key!r}: set exactly one of sparse_ratio and sparse_threshold"
            )
        _check_ratio(key, "sparse_ratio", self.sparse_ratio)
        if self.sparse_threshold is not None and (
            not _is_real(self.sparse_threshold) or math.isnan(self.sparse_threshold)
        ):
            raise ValueError(
                f"request {key!r}: sparse_threshold must be a number; got {self.sparse_threshold!r}"
            )
        _check_ratio(key, "min_sparse_ratio", self.min_sparse_ratio)
        _check_ratio(key, "max_sparse_ratio", self.max_sparse_ratio)
        if (
            self.min_sparse_ratio is not None
            and self.max_sparse_ratio is not None
            and self.min_sparse_ratio > self.max_sparse_ratio
        ):
            raise ValueError(
                f"request {key!r}: min_sparse_ratio {self.min_sparse_ratio} is greater than "
                f"max_sparse_ratio {self.max_sparse_ratio}"
            )
        b = self.internal_metric_block
        if b is not None:
            if not _is_int(b) or b < 1:
                raise ValueError(
                    f"request {key!r}: internal_metric_block must be an int >= 1; got {b!r}"
                )
            # A channel grid may keep singleton dims (out_channel on a weight: [C, 1, 1, 1]).
            if not _is_channel_grid(self.metric.shape):
                raise ValueError(
                    f"request {key!r}: internal_metric_block needs a 1-D metric grid (channels); "
                    f"got shape {_fmt_shape(self.metric.shape)}"
                )
            if self.metric.numel() % b != 0:
                raise ValueError(
                    f"request {key!r}: internal_metric_block {b} does not divide the "
                    f"{self.metric.numel()} cells of the metric"
                )


def _is_channel_grid(shape: Sequence[int]) -> bool:
    """True when at most one dim has more than one cell: a vector of channels."""
    return sum(1 for n in shape if n != 1) <= 1


@attrs.define
class _Unit:
    """One independently solved target: a request, or a dependency group merged into one."""

    keys: list[Hashable]
    metric: Tensor  # flat, one value per (chunk of) cell(s) actually ranked
    grid_shape: tuple[int, ...]
    devices: list[torch.device]
    block_numel: int
    chunk: int
    sparse_ratio: float | None
    sparse_threshold: float | None
    lo: int
    hi: int
    global_group_id: Hashable | None


def _bounds(n: int, min_ratio: float | None, max_ratio: float | None) -> tuple[int, int]:
    lo = 0 if min_ratio is None else min(max(_ceil(n * min_ratio), 0), n)
    hi = n if max_ratio is None else min(max(_floor(n * max_ratio), 0), n)
    if lo > hi:
        lo = hi  # rounding emptied [ceil(n*min), floor(n*max)]: the upper bound wins
    return lo, hi


def _common(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Bring tensors to one dtype and device (the first's), copying only where they differ."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    device = tensors[0].device
    return [t.to(device=device, dtype=dtype) for t in tensors]


def _make_unit(members: list[MaskRequest], group: Hashable | None) -> _Unit:
    first = members[0]
    if group is not None:
        for r in members[1:]:
            if tuple(r.metric.shape) != tuple(first.metric.shape) and not (
                # Channel grids of one length match whatever dim they lie on (an Embedding's
                # [1, C] beside a Linear's [C, 1]).
                _is_channel_grid(r.metric.shape)
                and _is_channel_grid(first.metric.shape)
                and r.metric.numel() == first.metric.numel()
            ):
                raise ValueError(
                    f"dependency group {group!r}: metric shapes differ: request {first.key!r} has "
                    f"{_fmt_shape(first.metric.shape)}, request {r.key!r} has "
                    f"{_fmt_shape(r.metric.shape)}"
                )
            for name in ("sparse_ratio", "sparse_threshold", "global_group_id",
                         "internal_metric_block"):
                if getattr(r, name) != getattr(first, name):
                    raise ValueError(
                        f"dependency group {group!r}: {name} differs: request {first.key!r} has "
                        f"{getattr(first, name)!r}, request {r.key!r} has {getattr(r, name)!r}"
                    )
    if len(members) == 1:
        metric = first.metric.reshape(-1)
    else:
        metric = torch.stack([m.reshape(-1) for m in _common([r.metric for r in members])]).mean(0)
    block_numel = sum(r.block_numel for r in members)
    chunk = first.internal_metric_block or 1
    if chunk > 1:
        metric = metric.view(-1, chunk).mean(1)
        block_numel *= chunk
    lo, hi = _bounds(metric.numel(), first.min_sparse_ratio, first.max_sparse_ratio)
    return _Unit(
        keys=[r.key for r in members],
        metric=metric,
        grid_shape=tuple(first.metric.shape),
        devices=[r.metric.device for r in members],
        block_numel=block_numel,
        chunk=chunk,
        sparse_ratio=first.sparse_ratio,
        sparse_threshold=first.sparse_threshold,
        lo=lo,
        hi=hi,
        global_group_id=first.global_group_id,
    )


# Below this many values torch.kthvalue alone is fast enough; above it, a sample narrows the
# search first (see _kth_smallest).
_DIRECT_SELECT_MAX = 1 << 18
_SAMPLE_SIZE = 1 << 16
# Half-width of the bracket in standard deviations of the sample rank of the k-th value (a miss
# is then a ~1e-4 event), plus extra ranks on each side so that tiny quantiles get a margin too.
_SAMPLE_SIGMAS = 4.0
_SAMPLE_SLACK = 32
_TIE_CHUNK = 4096


def _kth_smallest(segs: Sequence[Tensor], k: int) -> Tensor:
    """The k-th smallest value (1-based) over the concatenation of 1-D ``segs``.

    All segments share dtype and device. On large inputs a full torch.kthvalue costs ~15 ns per
    value on one CPU thread, so a fixed-seed sample first brackets the answer: counting below the
    bracket and selecting inside it touches the data with cheap vectorised passes only. The result
    is exact either way; an unlucky bracket just falls back to the full kthvalue.
    """
    n = sum(s.numel() for s in segs)
    if n <= _DIRECT_SELECT_MAX:
        return torch.kthvalue(torch.cat(list(segs)) if len(segs) > 1 else segs[0], k).values

    device = segs[0].device
    # A private, seeded generator: results must not depend on, or disturb, the global RNG.
    gen = torch.Generator(device=device).manual_seed(0x5EED)
    samples = []
    for s in segs:
        if s.numel():
            m = max(1, math.ceil(_SAMPLE_SIZE * s.numel() / n))
            idx = torch.randint(0, s.numel(), (m,), generator=gen, device=device)
            samples.append(s[idx])
    sample = torch.sort(torch.cat(samples)).values
    ns = sample.numel()
    q = k / n
    margin = _SAMPLE_SIGMAS * math.sqrt(ns * q * (1.0 - q)) + _SAMPLE_SLACK
    lo_rank = math.floor(q * ns - margin)
    hi_rank = math.ceil(q * ns + margin)
    lo = sample[lo_rank] if lo_rank >= 0 else None
    hi = sample[hi_rank] if hi_rank < ns else None

    below = 0 if lo is None else sum(int(torch.count_nonzero(s < lo)) for s in segs)
    upto = n if hi is None else sum(int(torch.count_nonzero(s <= hi)) for s in segs)
    if below < k <= upto:
        if lo is not None and hi is not None and bool(lo == hi):
            return lo
        parts = []
        for s in segs:
            inside = s <= hi if hi is not None else torch.ones_like(s, dtype=torch.bool)
            if lo is not None:
                inside &= s >= lo
            parts.append(s[inside])
        return torch.kthvalue(torch.cat(parts), k - below).values
    return torch.kthvalue(torch.cat(list(segs)), k).values


def _keep_first_true(mask: Tensor, count: int) -> None:
    """In place: leave only the first ``count`` True values of the 1-D ``mask``.

    A cumsum over a large bool tensor is slow, so per-chunk counts locate the chunk holding the
    cut and only that chunk is searched element by element. Needs 0 < count <= mask.sum().
    """
    n = mask.numel()
    full = (n // _TIE_CHUNK) * _TIE_CHUNK
    start, before = full, 0
    if full:
        cum = torch.count_nonzero(mask[:full].view(-1, _TIE_CHUNK), dim=1).cumsum(0)
        chunk = int(torch.count_nonzero(cum < count))
        if chunk < cum.numel():
            start = chunk * _TIE_CHUNK
        before = int(cum[chunk - 1]) if chunk > 0 else 0
    window = mask[start : start + _TIE_CHUNK]
    pos = start + int(window.nonzero()[count - before - 1, 0])
    mask[pos + 1 :] = False


def _keep_masks_k_smallest(segs: Sequence[Tensor], k: int) -> list[Tensor]:
    """Keep masks that prune exactly the ``k`` smallest values over the concatenated ``segs``.

    Ties at the cut are pruned in concatenation order (earlier segment, then lower index first).
    """
    n = sum(s.numel() for s in segs)
    if k <= 0:
        return [torch.ones_like(s, dtype=torch.bool) for s in segs]
    if k >= n:
        return [torch.zeros_like(s, dtype=torch.bool) for s in segs]
    v = _kth_smallest(segs, k)
    need = k - sum(int(torch.count_nonzero(s < v)) for s in segs)  # ties at v still to prune
    tie_counts = [int(torch.count_nonzero(s == v)) for s in segs]
    keeps = []
    for s, c in zip(segs, tie_counts):
        if need >= c:  # every tie in this segment is pruned (or there are none)
            keeps.append(s > v)
        elif need == 0:  # the cut lies in an earlier segment: keep all ties here
            keeps.append(s >= v)
        else:
            ties = s == v
            _keep_first_true(ties, need)
            keeps.append(~((s < v) | ties))
        need = max(need - c, 0)
    return keeps


def _below_threshold(metric: Tensor, threshold: float) -> Tensor:
    """``metric < threshold`` computed exactly, whatever the metric's precision.

    Comparing against the threshold rounded to the metric's dtype could flip the value equal to
    the rounded threshold; the smallest representable value >= threshold gives the exact answer.
    """
    t = torch.tensor(threshold, dtype=metric.dtype, device=metric.device)
    if float(t) < threshold:
        t = torch.nextafter(t, torch.full_like(t, math.inf))
    return metric < t


def _clamp(count: int, unit: _Unit) -> int:
    return min(max(count, unit.lo), unit.hi)


def _solve_alone(unit: _Unit) -> Tensor:
    m = unit.metric
    n = m.numel()
    if unit.sparse_threshold is not None:
        below = _below_threshold(m, unit.sparse_threshold)
        count = int(torch.count_nonzero(below))
        if _clamp(count, unit) == count:
            return ~below  # exactly the cells below the threshold: no selection needed
        return _keep_masks_k_smallest([m], _clamp(count, unit))[0]
    assert unit.sparse_ratio is not None  # internal invariant, guaranteed by MaskRequest
    return _keep_masks_k_smallest([m], _clamp(_floor(n * unit.sparse_ratio), unit))[0]


# Pivots per round of _greedy_take; each round narrows the search roughly by this factor
# divided by the number of targets, hence the per-target floor.
_PIVOTS = 2048
_PIVOTS_PER_TARGET = 16


def _greedy_take(cands: Sequence[Tensor], weights: Sequence[int], budget: int) -> list[int]:
    """How many leading cells of each ascending ``cands[t]`` the greedy fill takes.

    The greedy visits all cells in ascending value (ties: earlier list first, then position) and
    takes each while the running weight stays within ``budget``, stopping at the first cell that
    does not fit. Since the weights are positive, the taken cells form a prefix of that order, ended
    just before the cell of value v* = the smallest value v with W(v) > budget, where W(v) is the
    weight of all cells <= v. Sorting the union to find v* would cost as much as all the per-target
    sorts together; instead, rounds of evenly spaced pivots evaluated with searchsorted narrow
    per-list windows of positions that may still hold v*.
    """
    lens = [c.numel() for c in cands]
    if sum(w * n for w, n in zip(weights, lens)) <= budget:
        return lens
    device = cands[0].device
    w = torch.tensor(list(weights), dtype=torch.int64, device=device)
    lefts, rights = [0] * len(cands), list(lens)
    v_star: Tensor | None = None
    pivots_per_round = max(_PIVOTS, _PIVOTS_PER_TARGET * len(cands))
    while True:
        window = sum(right - left for left, right in zip(lefts, rights))
        if window == 0:
            break
        parts = []
        for c, left, right in zip(cands, lefts, rights):
            if right > left:
                if window <= pivots_per_round:
                    parts.append(c[left:right])
                else:
                    k = max(1, math.ceil(pivots_per_round * (right - left) / window))
                    parts.append(c[left + torch.arange(k, device=device) * (right - left) // k])
        pivots = torch.unique(torch.cat(parts))  # sorted, distinct
        at_most = torch.stack(
            [torch.searchsorted(c, pivots, right=True) for c in cands]
        )  # (targets, pivots): cells <= each pivot
        fits = int(torch.count_nonzero((w[:, None] * at_most).sum(0) <= budget))
        if fits > 0:
            lefts = [max(left, int(n)) for left, n in zip(lefts, at_most[:, fits - 1].tolist())]
        if fits < pivots.numel():
            v_star = pivots[fits]
            below = [int(torch.searchsorted(c, v_star.reshape(1))) for c in cands]
            rights = [min(r, n) for r, n in zip(rights, below)]
    if v_star is None:  # unreachable: the full weight exceeds the budget, so the max is v*
        raise RuntimeError("greedy selection found no cut")
    take = [int(torch.searchsorted(c, v_star.reshape(1))) for c in cands]
    upto = [int(torch.searchsorted(c, v_star.reshape(1), right=True)) for c in cands]
    ties = [u - t for u, t in zip(upto, take)]
    left = budget - sum(wt * t for wt, t in zip(weights, take))
    for i, (wt, n) in enumerate(zip(weights, ties)):
        fit = min(n, left // wt)
        take[i] += fit
        left -= fit * wt
        if fit < n:
            break
    return take


def _solve_global(units: list[_Unit], ratio: float) -> list[Tensor]:
    metrics = _common([u.metric for u in units])
    total = sum(u.metric.numel() * u.block_numel for u in units)
    budget = _floor(total * ratio)
    numels = {u.block_numel for u in units}
    if len(numels) == 1 and all(u.lo == 0 and u.hi == u.metric.numel() for u in units):
        # Equal cell sizes and no bounds: the budget is a plain cell count over the union.
        return _keep_masks_k_smallest(metrics, budget // numels.pop())

    # Each target contributes its `lo` smallest cells unconditionally; its ranks lo..hi-1 compete
    # for the rest of the element budget, cheapest first. Stable sorts make ties fall to the
    # lowest index, and _greedy_take breaks ties between targets by their order, as the fast
    # path does.
    open_units = [i for i, u in enumerate(units) if u.hi > u.lo]
    orders = {i: torch.sort(metrics[i], stable=True) for i in open_units}
    counts = [u.lo for u in units]
    remaining = budget - sum(u.lo * u.block_numel for u in units)
    if remaining > 0 and open_units:
        taken = _greedy_take(
            [orders[i].values[units[i].lo : units[i].hi] for i in open_units],
            [units[i].block_numel for i in open_units],
            remaining,
        )
        for i, t in zip(open_units, taken):
            counts[i] += t
    keeps = []
    for i, (m, c) in enumerate(zip(metrics, counts)):
        if i in orders:
            keep = torch.ones(m.numel(), dtype=torch.bool, device=m.device)
            keep[orders[i].indices[:c]] = False
        else:
            keep = _keep_masks_k_smallest([m], c)[0]
        keeps.append(keep)
    return keeps


def solve_masks(requests: Sequence[MaskRequest]) -> dict[Hashable, Tensor]:
    """Solve the pruning masks of all ``requests`` together.

    Dependency groups are merged first (mean metric, one shared mask), then
    ``internal_metric_block`` chunks are averaged, then every target is solved alone or, when it
    has a ``global_group_id``, ranked together with the rest of its global group under one element
    budget. Ties are always pruned in request order, then lowest flat index first.

    :param requests: the targets; keys must be unique.
    :returns: for each request key, a ``bool`` mask with the shape of its metric, on its metric's
        device (``True`` = keep).
    :raises ValueError: for invalid or inconsistent requests; the message names the key or group.
    """
    seen: set[Hashable] = set()
    for r in requests:
        if not isinstance(r, MaskRequest):
            raise ValueError(f"expected MaskRequest objects; got {type(r).__name__}")
        if r.key in seen:
            raise ValueError(f"request key {r.key!r} appears more than once")
        seen.add(r.key)
        if r.metric.numel() and bool(torch.isnan(r.metric).any()):
            raise ValueError(f"request {r.key!r}: metric contains NaN")

    shapes = {r.key: tuple(r.metric.shape) for r in requests}
    dep_groups: dict[Hashable, list[MaskRequest]] = {}
    members_of: list[tuple[list[MaskRequest], Hashable | None]] = []
    for r in requests:
        if r.dependency_group_id is None:
            members_of.append(([r], None))
        elif r.dependency_group_id in dep_groups:
            dep_groups[r.dependency_group_id].append(r)
        else:
            dep_groups[r.dependency_group_id] = [r]
            members_of.append((dep_groups[r.dependency_group_id], r.dependency_group_id))
    units = [_make_unit(members, group) for members, group in members_of]

    global_groups: dict[Hashable, list[_Unit]] = {}
    keeps: dict[int, Tensor] = {}
    for u in units:
        if u.global_group_id is None:
            keeps[id(u)] = _solve_alone(u)
        else:
            global_groups.setdefault(u.global_group_id, []).append(u)
    for gid, group in global_groups.items():
        ratios = []
        for u in group:
            if u.sparse_ratio is None:
                raise ValueError(
                    f"global group {gid!r}: request {u.keys[0]!r} uses sparse_threshold; "
                    "global groups rank by sparse_ratio only"
                )
            ratios.append(u.sparse_ratio)
        if any(r != ratios[0] for r in ratios):
            pairs = ", ".join(f"{u.keys[0]!r}: {r}" for u, r in zip(group, ratios))
            raise ValueError(
                f"global group {gid!r}: all requests need the same sparse_ratio; got {pairs}"
            )
        for u, keep in zip(group, _solve_global(group, ratios[0])):
            keeps[id(u)] = keep

    result: dict[Hashable, Tensor] = {}
    for u in units:
        keep = keeps[id(u)]
        if u.chunk > 1:
            keep = keep.repeat_interleave(u.chunk)
        for i, (key, device) in enumerate(zip(u.keys, u.devices)):
            # Each member gets its own tensor so that in-place updates of one never leak.
            mask = keep.reshape(shapes[key]).to(device)
            result[key] = mask.clone() if i > 0 and mask.device == keep.device else mask
    return {r.key: result[r.key] for r in requests}


# --------------------------------------------------------------------------------------------
# Using masks
# --------------------------------------------------------------------------------------------


def align_mask(
    source_mask: Tensor,
    source_shape: tuple[int, ...],
    dims: Sequence[int],
    target_shape: tuple[int, ...],
) -> Tensor:
    """Derive a target's mask from a source mask along some of the source's dims.

    Position ``i`` of the target is kept if any source element in the slice at index ``i`` of
    ``dims`` is kept; the slices are laid out in the order of ``dims`` (row-major) and reshaped to
    ``target_shape``. E.g. a Linear weight mask ``(4, 3)`` with ``dims=[0]`` gives the bias mask
    ``bias[i] = weight_mask[i, :].any()``.

    :param source_mask: ``bool`` mask broadcastable to ``source_shape`` (may be compact).
    :param source_shape: shape of the source tensor.
    :param dims: source dims that index the target; negative values count from the end.
    :param target_shape: shape of the target; its size must be the product of those dims.
    :returns: a ``bool`` mask of shape ``target_shape``.
    """
    source_shape = tuple(int(s) for s in source_shape)
    target_shape = tuple(int(s) for s in target_shape)
    ndim = len(source_shape)
    if source_mask.dtype != torch.bool:
        raise ValueError(f"source mask must be bool; got {source_mask.dtype}")
    try:
        broadcast = tuple(torch.broadcast_shapes(tuple(source_mask.shape), source_shape))
    except RuntimeError:
        broadcast = None
    if broadcast != source_shape:
        raise ValueError(
            f"source mask of shape {_fmt_shape(source_mask.shape)} does not broadcast to "
            f"{_fmt_shape(source_shape)}"
        )
    norm: list[int] = []
    for d in dims:
        if not _is_int(d) or not -ndim <= d < ndim:
            raise ValueError(
                f"dim {d!r} is out of range for source shape {_fmt_shape(source_shape)}"
            )
        d %= ndim
        if d in norm:
            raise ValueError(f"dim {d} appears more than once in dims {list(dims)}")
        norm.append(d)
    size = math.prod(source_shape[d] for d in norm)
    if math.prod(target_shape) != size:
        raise ValueError(
            f"target shape {_fmt_shape(target_shape)} has {math.prod(target_shape)} elements but "
            f"dims {list(dims)} of source shape {_fmt_shape(source_shape)} give {size}"
        )

    mask = source_mask.reshape((1,) * (ndim - source_mask.ndim) + tuple(source_mask.shape))
    # Dims of size 1 in a compact mask already stand for their whole extent: no reduction needed.
    others = tuple(d for d in range(ndim) if d not in norm and mask.shape[d] > 1)
    if others:
        mask = mask.any(dim=others, keepdim=True)
    rest = [d for d in range(ndim) if d not in norm]
    mask = mask.permute(*norm, *rest).reshape([mask.shape[d] for d in norm])
    return mask.expand([source_shape[d] for d in norm]).reshape(target_shape)


def apply_mask(t: Tensor, mask: Tensor, method: str, *, bits: Tensor | None = None) -> Tensor:
    """Apply ``mask`` to ``t``; gradients flow to ``t``.

    :param t: the tensor to mask.
    :param mask: ``bool`` mask broadcastable to ``t`` (``True`` = keep).
    :param method: ``"mul"`` zeroes pruned positions; ``"add"`` adds :data:`MASK_ADD_VALUE` to
        them (for scores fed to Softmax).
    :param bits: optional ``mask_bits(mask, t.dtype)``, cached by the caller (``"mul"`` only).
    :returns: a tensor of ``t``'s shape and dtype.
    """
    if method not in _APPLY_METHODS:
        raise ValueError(f"unknown mask method {method!r}; expected 'mul' or 'add'")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool; got {mask.dtype}")
    # This runs in every forward: torch.broadcast_shapes costs ~20 us a call (it is the
    # symbolic-shape-aware reference implementation); this check gives the same answer in < 1 us.
    t_shape, m_shape = t.shape, mask.shape
    if len(m_shape) > len(t_shape) or any(
        m != 1 and m != s for m, s in zip(reversed(m_shape), reversed(t_shape))
    ):
        raise ValueError(
            f"mask of shape {_fmt_shape(mask.shape)} does not broadcast to the tensor's shape "
            f"{_fmt_shape(t.shape)}"
        )
    if method == "mul":
        # Not t * mask: a pruned inf or NaN must become 0, not NaN. Not torch.where either: its
        # CPU kernel branches per element, and a pruning mask is unpredictable (~3.5 ns per
        # element, 30x a multiply). AND with an all-ones/all-zeros integer of the same width is
        # branch-free and bit-identical to where(mask, t, 0), gradient included.
        # functorch transforms (vmap, grad, ...) cannot run an autograd.Function without
        # setup_context, whose apply() costs ~30 us (inspect.signature): where() there only.
        if t.element_size() in _INT_OF_SIZE and not torch._C._are_functorch_transforms_active():
            return _AndMask.apply(t, mask if bits is None else bits)
        return torch.where(mask, t, t.new_zeros(()))
    # x + (-0.0) is x bit for bit (-0.0 included), and 0.0 * MASK_ADD_VALUE is -0.0: kept
    # positions are exact, pruned ones get t + MASK_ADD_VALUE, as where() gave, branch-free.
    return t + (~mask).to(t.dtype).mul_(MASK_ADD_VALUE)


_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def mask_bits(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """The integer form of a bool ``mask`` for tensors of ``dtype`` (-1 keep, 0 prune).

    Pass it as ``apply_mask(..., bits=)`` to skip the conversion in every call.
    """
    return mask.to(_INT_OF_SIZE[torch.empty((), dtype=dtype).element_size()]).neg_()


class _AndMask(torch.autograd.Function):
    """``where(mask, t, 0)`` as a bitwise AND; the gradient is masked the same way."""

    @staticmethod
    def forward(ctx, t: Tensor, mask: Tensor) -> Tensor:  # type: ignore[no-untyped-def, override]
        int_dtype = _INT_OF_SIZE[t.element_size()]
        bits = mask if mask.dtype == int_dtype else mask.to(int_dtype).neg_()
        ctx.save_for_backward(bits)
        ctx.set_materialize_grads(False)
        return torch.bitwise_and(t.view(int_dtype), bits).view(t.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[no-untyped-def, override]
        if grad is None:
            return None, None
        (bits,) = ctx.saved_tensors
        return _AndMask.apply(grad, bits), None
