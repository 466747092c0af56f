"""Tests for compress_core.masks.

Expected values are either worked out by hand on small tensors or computed by slow references
below (Python loops over float64 values), which share no code with the implementation.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compress_core import masks
from compress_core.masks import (
    MASK_ADD_VALUE,
    MaskRequest,
    align_mask,
    apply_mask,
    block_reduce,
    block_shape,
    expand_mask,
    solve_masks,
)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------------------------
# Slow references
# ----------------------------------------------------------------------------------------------


def ref_floor(x: float) -> int:
    return math.floor(x + 1e-9)


def ref_ceil(x: float) -> int:
    return math.ceil(x - 1e-9)


def ref_bounds(n: int, lo_r: float | None, hi_r: float | None) -> tuple[int, int]:
    lo = 0 if lo_r is None else ref_ceil(n * lo_r)
    hi = n if hi_r is None else ref_floor(n * hi_r)
    return (hi, hi) if lo > hi else (lo, hi)


def ref_rank(values: list[float]) -> list[int]:
    """Flat indices in pruning order: smallest first, ties by lowest index."""
    return sorted(range(len(values)), key=lambda i: (values[i], i))


def ref_keep(values: list[float], count: int) -> list[bool]:
    pruned = set(ref_rank(values)[:count])
    return [i not in pruned for i in range(len(values))]


def ref_global(
    metrics: list[list[float]], numels: list[int], ratio: float, bounds: list[tuple[int, int]]
) -> list[list[bool]]:
    """The spec's greedy: mandatory lo cells, then cheapest candidates until one does not fit."""
    budget = ref_floor(sum(len(m) * e for m, e in zip(metrics, numels)) * ratio)
    counts = [lo for lo, _ in bounds]
    used = sum(lo * e for (lo, _), e in zip(bounds, numels))
    cands = []
    for t, (m, (lo, hi)) in enumerate(zip(metrics, bounds)):
        ordered = sorted(m)
        cands += [(ordered[r], t, r) for r in range(lo, hi)]
    for _, t, _ in sorted(cands):
        if used + numels[t] > budget:
            break
        used += numels[t]
        counts[t] += 1
    return [ref_keep(m, c) for m, c in zip(metrics, counts)]


def as_list(mask: torch.Tensor) -> list[bool]:
    return [bool(x) for x in mask.reshape(-1).tolist()]


def metric(values, shape=None) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.float32)
    return t.reshape(shape) if shape is not None else t


def solve_one(values, **kwargs) -> list[bool]:
    return as_list(solve_masks([MaskRequest(key="w", metric=metric(values), **kwargs)])["w"])


small_floats = st.lists(st.integers(0, 6).map(float), min_size=1, max_size=14)
ratios = st.sampled_from([0.0, 0.1, 0.25, 0.3, 0.5, 0.7, 0.9, 1.0])


# ----------------------------------------------------------------------------------------------
# block_shape
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("granularity", "shape", "activation", "expected"),
    [
        ("element", (16, 8, 3, 3), False, (1, 1, 1, 1)),
        ("element", (4, 5), True, (1, 1)),
        ("out_channel", (16, 8, 3, 3), False, (1, 8, 3, 3)),
        ("out_channel", (10,), False, (1,)),
        ("out_channel", (6, 4), False, (1, 4)),
        ("in_channel", (16, 8, 3, 3), False, (16, 1, 3, 3)),
        ("in_channel", (6, 4), False, (6, 1)),
        ("per_channel", (2, 5, 7), True, (2, 5, 1)),
        ("per_channel", (7,), True, (1,)),
        ([2, 3], (4, 6, 9), False, (1, 2, 3)),
        ((4,), (4, 6, 8), True, (1, 1, 4)),
        ([-1, 2], (4, 6, 8), False, (1, 6, 2)),
        ([-1, -1, -1], (4, 6, 8), False, (4, 6, 8)),
        ([1, 1], (3, 5), False, (1, 1)),
        ([], (3, 5), False, (1, 1)),
    ],
)
def test_block_shape(granularity, shape, activation, expected):
    assert block_shape(granularity, shape, activation=activation) == expected


@pytest.mark.parametrize(
    ("granularity", "shape", "activation", "message"),
    [
        ("out_channel", (4, 8), True,
         "'out_channel' is for parameters; use 'per_channel' for inputs/outputs"),
        ("in_channel", (4, 8), True,
         "'in_channel' is for parameters; use 'per_channel' for inputs/outputs"),
        ("per_channel", (4, 8), False,
         "'per_channel' is for inputs/outputs; use 'out_channel' (dim 0) or 'in_channel' (dim 1) "
         "for parameters"),
        ("in_channel", (8,), False, "'in_channel' needs a parameter with at least 2 dims"),
        ("out_channel", (), False, "at least 1 dim"),
        ("per_channel", (), True, "at least 1 dim"),
        ("channel", (4, 8), False, "unknown granularity 'channel'"),
        ([1, 3], (4, 8), False, "block size 3 does not divide dim 1 of size 8"),
        ([3, -1], (4, 8), False, "block size 3 does not divide dim 0 of size 4"),
        ([1, 1, 1], (4, 8), False, "has 3 dims but the tensor has only 2"),
        ([0], (4, 8), False, "must be >= 1 (or -1 for the whole dim)"),
        ([-2], (4, 8), False, "must be >= 1 (or -1 for the whole dim)"),
        ([2.0], (4, 8), False, "block sizes must be ints"),
        ([True], (4, 8), False, "block sizes must be ints"),
        (3, (4, 8), False, "granularity must be a string or a list of ints"),
    ],
)
def test_block_shape_errors(granularity, shape, activation, message):
    with pytest.raises(ValueError) as info:
        block_shape(granularity, shape, activation=activation)
    assert message in str(info.value)


# ----------------------------------------------------------------------------------------------
# block_reduce / expand_mask
# ----------------------------------------------------------------------------------------------


def ref_block_reduce(t: torch.Tensor, block: tuple[int, ...], reduce: str) -> torch.Tensor:
    grid = tuple(s // b for s, b in zip(t.shape, block))
    flat = t.double()
    out = torch.empty(grid, dtype=torch.float64)
    for cell in itertools.product(*(range(g) for g in grid)):
        members = [
            float(flat[tuple(c * b + o for c, b, o in zip(cell, block, offs))])
            for offs in itertools.product(*(range(b) for b in block))
        ]
        if reduce == "sum":
            out[cell] = sum(members)
        elif reduce == "mean":
            out[cell] = sum(members) / len(members)
        elif reduce == "max":
            out[cell] = max(members)
        else:
            out[cell] = math.sqrt(sum(x * x for x in members))
    return out


BLOCK_CASES = [
    ((4, 6), (1, 1)),
    ((4, 6), (2, 3)),
    ((4, 6), (1, 6)),
    ((4, 6), (4, 1)),
    ((6, 4, 3, 3), (1, 4, 3, 3)),
    ((6, 4, 3, 3), (6, 1, 3, 3)),
    ((6, 4, 3, 3), (2, 2, 1, 3)),
    ((2, 3, 8), (2, 3, 1)),
    ((12,), (4,)),
    ((12,), (12,)),
]


@pytest.mark.parametrize("reduce", ["sum", "mean", "max", "l2"])
@pytest.mark.parametrize(("shape", "block"), BLOCK_CASES)
def test_block_reduce_matches_loops(shape, block, reduce):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    got = block_reduce(t, block, reduce)
    assert got.shape == tuple(s // b for s, b in zip(shape, block))
    expected = ref_block_reduce(t, block, reduce)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_block_reduce_non_contiguous_input():
    t = torch.randn(6, 4, generator=torch.Generator().manual_seed(1)).t()  # (4, 6), strided
    expected = ref_block_reduce(t, (2, 3), "sum")
    got = block_reduce(t, (2, 3), "sum").double()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_block_reduce_unit_block_returns_input():
    t = torch.tensor([[-1.0, 2.0], [3.0, -4.0]])
    for reduce in ("sum", "mean", "max"):
        assert block_reduce(t, (1, 1), reduce) is t
    assert block_reduce(t, (1, 1), "l2").tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_block_reduce_gradient_flows():
    t = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    block_reduce(t, (1, 2), "sum").sum().backward()
    assert t.grad.tolist() == [[1.0, 1.0], [1.0, 1.0]]


@pytest.mark.parametrize(
    ("block", "reduce", "message"),
    [
        ((1,), "sum", "has 1 dims but the tensor has shape (4, 6)"),
        ((1, 4), "sum", "block size 4 does not divide dim 1 of size 6"),
        ((1, 2), "median", "unknown reduce 'median'"),
        ((0, 1), "sum", "block size 0 for dim 0 must be >= 1"),
    ],
)
def test_block_reduce_errors(block, reduce, message):
    with pytest.raises(ValueError) as info:
        block_reduce(torch.zeros(4, 6), block, reduce)
    assert message in str(info.value)


def ref_full_mask(grid_mask: torch.Tensor, block, shape) -> torch.Tensor:
    full = torch.empty(shape, dtype=torch.bool)
    for idx in itertools.product(*(range(s) for s in shape)):
        full[idx] = grid_mask[tuple(i // b for i, b in zip(idx, block))]
    return full


@pytest.mark.parametrize(
    ("shape", "block", "compact"),
    [
        ((16, 8, 3, 3), (1, 8, 3, 3), (16, 1, 1, 1)),
        ((16, 8, 3, 3), (16, 1, 3, 3), (1, 8, 1, 1)),
        ((4, 6), (2, 3), (4, 6)),
        ((4, 6), (1, 1), (4, 6)),
        ((4, 6), (4, 6), (1, 1)),
        ((2, 3, 8), (2, 3, 1), (1, 1, 8)),
        ((6, 4, 3, 3), (2, 4, 1, 3), (6, 1, 3, 1)),
        ((1, 5), (1, 5), (1, 1)),
    ],
)
def test_expand_mask_is_compact_and_equals_full_mask(shape, block, compact):
    grid = tuple(s // b for s, b in zip(shape, block))
    gen = torch.Generator().manual_seed(7)
    grid_mask = torch.rand(grid, generator=gen) < 0.5
    mask = expand_mask(grid_mask, block, shape)
    assert mask.dtype == torch.bool
    assert mask.shape == compact
    assert torch.equal(mask.expand(shape), ref_full_mask(grid_mask, block, shape))


def test_expand_mask_wrong_grid_shape():
    with pytest.raises(ValueError) as info:
        expand_mask(torch.ones(4, 1, dtype=torch.bool), (1, 8, 3, 3), (16, 8, 3, 3))
    assert "grid of (16, 1, 1, 1)" in str(info.value)


def test_granularity_round_trip_prunes_whole_channels():
    weight = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(2))
    block = block_shape("out_channel", tuple(weight.shape))
    grid = block_reduce(weight, block, "l2")
    keep = solve_masks([MaskRequest(key="w", metric=grid, sparse_ratio=0.5)])["w"]
    mask = expand_mask(keep, block, tuple(weight.shape))
    norms = [float(weight[i].double().norm()) for i in range(6)]
    expected = ref_keep(norms, 3)
    assert mask.shape == (6, 1, 1, 1)
    assert as_list(mask) == expected


# ----------------------------------------------------------------------------------------------
# solve_masks: one target
# ----------------------------------------------------------------------------------------------


def test_ratio_prunes_smallest_with_ties_by_lowest_index():
    # Four cells tie at 1.0; pruning 3 takes the 0.5 and then the two lowest-index ties.
    got = solve_one([1.0, 3.0, 1.0, 0.5, 1.0, 2.0, 1.0], sparse_ratio=0.5)
    assert got == [False, True, False, False, True, True, True]


def test_ratio_count_uses_epsilon():
    # 100 * 0.57 == 56.99999999999999 in floating point; 57 cells must go.
    got = solve_one([float(i) for i in range(100)], sparse_ratio=0.57)
    assert got == [False] * 57 + [True] * 43
    got = solve_one([float(i) for i in range(10)], sparse_ratio=0.7)
    assert got == [False] * 7 + [True] * 3


def test_ratio_extremes_and_all_ties():
    assert solve_one([2.0, 2.0, 2.0], sparse_ratio=0.0) == [True, True, True]
    assert solve_one([2.0, 2.0, 2.0], sparse_ratio=1.0) == [False, False, False]
    assert solve_one([2.0] * 5, sparse_ratio=0.4) == [False, False, True, True, True]


def test_mask_has_metric_shape_and_bool_dtype():
    m = metric([[4.0, 1.0, 3.0], [0.0, 5.0, 2.0]])
    keep = solve_masks([MaskRequest(key="w", metric=m, sparse_ratio=0.5)])["w"]
    assert keep.dtype == torch.bool
    assert keep.tolist() == [[True, False, True], [False, True, False]]


def test_empty_metric():
    keep = solve_masks([MaskRequest(key="w", metric=torch.empty(0), sparse_ratio=0.5)])["w"]
    assert keep.shape == (0,) and keep.dtype == torch.bool


@SETTINGS
@given(values=small_floats, ratio=ratios)
def test_ratio_matches_reference(values, ratio):
    assert solve_one(values, sparse_ratio=ratio) == ref_keep(values, ref_floor(len(values) * ratio))


def test_threshold_prunes_strictly_below():
    assert solve_one([0.1, 0.5, 0.3, 0.5, 0.9], sparse_threshold=0.5) == [
        False, True, False, True, True,
    ]
    assert solve_one([1.0, 2.0], sparse_threshold=float("inf")) == [False, False]
    assert solve_one([1.0, 2.0], sparse_threshold=-1.0) == [True, True]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_threshold_is_exact_in_low_precision(dtype):
    x = torch.tensor([0.1], dtype=dtype)
    value = float(x)
    above = math.nextafter(value, math.inf)  # rounds back to x in the metric's dtype
    for threshold, kept in [(value, True), (above, False)]:
        keep = solve_masks([MaskRequest(key="w", metric=x, sparse_threshold=threshold)])["w"]
        assert keep.tolist() == [kept]


def test_ratio_clamps():
    values = [float(i) for i in range(10)]
    # min raises the count: ceil(10 * 0.35) = 4
    assert solve_one(values, sparse_ratio=0.2, min_sparse_ratio=0.35) == ref_keep(values, 4)
    # max lowers it: floor(10 * 0.25) = 2
    assert solve_one(values, sparse_ratio=0.6, max_sparse_ratio=0.25) == ref_keep(values, 2)
    # inside the bounds nothing changes
    assert solve_one(values, sparse_ratio=0.5, min_sparse_ratio=0.1, max_sparse_ratio=0.9) == (
        ref_keep(values, 5)
    )


def test_clamp_interval_emptied_by_rounding_uses_max():
    # n=3: ceil(1.2) = 2 > floor(1.5) = 1, so both bounds become 1.
    values = [3.0, 1.0, 2.0]
    assert solve_one(values, sparse_ratio=0.0, min_sparse_ratio=0.4, max_sparse_ratio=0.5) == [
        True, False, True,
    ]


def test_threshold_clamps():
    values = [0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4]
    # 5 cells below 0.6, at most floor(8 * 0.5) = 4: keep the rest of the below-threshold cells
    got = solve_one(values, sparse_threshold=0.6, max_sparse_ratio=0.5)
    assert got == [True, False, True, False, True, False, True, False]
    # 1 cell below 0.15, at least ceil(8 * 0.3) = 3 must go
    got = solve_one(values, sparse_threshold=0.15, min_sparse_ratio=0.3)
    assert got == [True, False, True, False, True, False, True, True]


@SETTINGS
@given(
    values=small_floats,
    threshold=st.sampled_from([-1.0, 0.0, 2.0, 2.5, 4.0, 7.0]),
    lo=st.sampled_from([None, 0.0, 0.2, 0.5]),
    hi=st.sampled_from([None, 0.3, 0.6, 1.0]),
)
def test_threshold_with_clamps_matches_reference(values, threshold, lo, hi):
    if lo is not None and hi is not None and lo > hi:
        lo, hi = hi, lo
    below = sum(v < threshold for v in values)
    lo_n, hi_n = ref_bounds(len(values), lo, hi)
    expected = ref_keep(values, min(max(below, lo_n), hi_n))
    got = solve_one(values, sparse_threshold=threshold, min_sparse_ratio=lo, max_sparse_ratio=hi)
    assert got == expected


@SETTINGS
@given(
    values=small_floats,
    ratio=ratios,
    lo=st.sampled_from([None, 0.0, 0.2, 0.5]),
    hi=st.sampled_from([None, 0.3, 0.6, 1.0]),
)
def test_ratio_with_clamps_matches_reference(values, ratio, lo, hi):
    if lo is not None and hi is not None and lo > hi:
        lo, hi = hi, lo
    lo_n, hi_n = ref_bounds(len(values), lo, hi)
    expected = ref_keep(values, min(max(ref_floor(len(values) * ratio), lo_n), hi_n))
    got = solve_one(values, sparse_ratio=ratio, min_sparse_ratio=lo, max_sparse_ratio=hi)
    assert got == expected


# ----------------------------------------------------------------------------------------------
# solve_masks: large inputs (the sampled selection and chunked tie search)
# ----------------------------------------------------------------------------------------------


def sorted_reference_keep(values: torch.Tensor, count: int) -> torch.Tensor:
    order = torch.sort(values.double(), stable=True).indices
    keep = torch.ones(values.numel(), dtype=torch.bool)
    keep[order[:count]] = False
    return keep


@pytest.mark.parametrize("ratio", [0.001, 0.37, 0.5, 0.999])
def test_large_metric_exact_count_with_many_ties(ratio):
    gen = torch.Generator().manual_seed(3)
    # 300k cells (past the direct-kthvalue size) drawn from 50 levels: every cut lands on ties.
    m = torch.randint(0, 50, (300_000,), generator=gen).float()
    keep = solve_masks([MaskRequest(key="w", metric=m, sparse_ratio=ratio)])["w"]
    count = ref_floor(m.numel() * ratio)
    assert int((~keep).sum()) == count
    assert torch.equal(keep, sorted_reference_keep(m, count))


def test_large_global_fast_path_matches_sorted_reference():
    gen = torch.Generator().manual_seed(4)
    sizes = (120_000, 90_000, 150_000)
    ms = [torch.randint(0, 1000, (n,), generator=gen).float() / 7 for n in sizes]
    reqs = [
        MaskRequest(key=i, metric=m, sparse_ratio=0.42, global_group_id="g")
        for i, m in enumerate(ms)
    ]
    out = solve_masks(reqs)
    whole = sorted_reference_keep(torch.cat(ms), ref_floor(360_000 * 0.42))
    assert torch.equal(torch.cat([out[i] for i in range(3)]), whole)


@settings(SETTINGS, max_examples=150)
@given(
    # few levels make ties at the cut; many levels make a zero-width bracket miss
    values=st.integers(1, 1000).flatmap(
        lambda levels: st.lists(st.integers(0, levels).map(float), min_size=1, max_size=60)
    ),
    ratio=st.floats(0.0, 1.0),
    sample=st.sampled_from([1, 4, 16]),
    sigmas=st.sampled_from([0.0, 1.0, 4.0]),
    slack=st.sampled_from([0, 1]),
    chunk=st.sampled_from([1, 3, 8]),
)
def test_sampled_selection_is_exact(values, ratio, sample, sigmas, slack, chunk):
    # Shrinking the internal sizes sends tiny inputs through the sampled bracket, its fallback
    # (a zero-width bracket often misses) and the chunked tie search, so they are checked against
    # the reference as well.
    half = len(values) // 2
    reqs = [
        MaskRequest(key="a", metric=metric(values[:half]), sparse_ratio=ratio, global_group_id=1),
        MaskRequest(key="b", metric=metric(values[half:]), sparse_ratio=ratio, global_group_id=1),
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(masks, "_DIRECT_SELECT_MAX", 0)
        mp.setattr(masks, "_SAMPLE_SIZE", sample)
        mp.setattr(masks, "_SAMPLE_SIGMAS", sigmas)
        mp.setattr(masks, "_SAMPLE_SLACK", slack)
        mp.setattr(masks, "_TIE_CHUNK", chunk)
        out = solve_masks(reqs)
    expected = ref_keep(values, ref_floor(len(values) * ratio))
    assert as_list(out["a"]) + as_list(out["b"]) == expected


# ----------------------------------------------------------------------------------------------
# solve_masks: global groups
# ----------------------------------------------------------------------------------------------


def test_global_group_ranks_across_targets():
    reqs = [
        MaskRequest(key="a", metric=metric([0.1, 0.9, 0.2, 0.8]), sparse_ratio=0.5,
                    global_group_id="g"),
        MaskRequest(key="b", metric=metric([0.7, 0.3, 0.6, 0.05]), sparse_ratio=0.5,
                    global_group_id="g"),
    ]
    out = solve_masks(reqs)
    # The 4 smallest of all 8: 0.05, 0.1, 0.2, 0.3
    assert as_list(out["a"]) == [False, True, False, True]
    assert as_list(out["b"]) == [True, False, True, False]


def test_global_ties_go_to_earlier_target_first():
    reqs = [
        MaskRequest(key="a", metric=metric([1.0, 1.0]), sparse_ratio=0.5, global_group_id="g"),
        MaskRequest(key="b", metric=metric([1.0, 1.0]), sparse_ratio=0.5, global_group_id="g"),
    ]
    out = solve_masks(reqs)
    assert as_list(out["a"]) == [False, False]
    assert as_list(out["b"]) == [True, True]


def test_global_budget_counts_elements_and_stops_at_first_misfit():
    # Elements: 4 * 3 + 2 * 1 = 14; budget floor(14 * 0.5) = 7.
    # Ascending: a0 (0.1, 3 el) fits -> 3; b0 (0.2, 1) -> 4; a1 (0.3, 3) -> 7; b1 (0.4, 1) would be
    # 8 > 7: stop there.
    reqs = [
        MaskRequest(key="a", metric=metric([0.1, 0.3, 0.9, 0.8]), block_numel=3, sparse_ratio=0.5,
                    global_group_id="g"),
        MaskRequest(key="b", metric=metric([0.2, 0.4]), block_numel=1, sparse_ratio=0.5,
                    global_group_id="g"),
    ]
    out = solve_masks(reqs)
    assert as_list(out["a"]) == [False, False, True, True]
    assert as_list(out["b"]) == [False, True]


def test_global_greedy_stops_even_if_a_smaller_cell_would_fit():
    # Elements 2 * 4 + 3 * 1 = 11, budget floor(11 * 0.5) = 5. a0 (4 el) fits; a1 (4 el) does
    # not, and the fill stops there although b's single-element cells would still fit.
    reqs = [
        MaskRequest(key="a", metric=metric([0.1, 0.2]), block_numel=4, sparse_ratio=0.5,
                    global_group_id="g"),
        MaskRequest(key="b", metric=metric([0.5, 0.6, 0.7]), sparse_ratio=0.5, global_group_id="g"),
    ]
    out = solve_masks(reqs)
    assert as_list(out["a"]) == [False, True]
    assert as_list(out["b"]) == [True, True, True]


def test_global_greedy_stop_applies_within_ties():
    # Every cell ties at 0.5. Elements 2 * 3 + 3 * 1 = 9, budget floor(9 * 0.25) = 2. The first
    # cell in order is a's (earlier target), 3 elements > 2: the fill stops before b's cells.
    reqs = [
        MaskRequest(key="a", metric=metric([0.5, 0.5]), block_numel=3, sparse_ratio=0.25,
                    global_group_id="g"),
        MaskRequest(key="b", metric=metric([0.5, 0.5, 0.5]), sparse_ratio=0.25,
                    global_group_id="g"),
    ]
    out = solve_masks(reqs)
    assert as_list(out["a"]) == [True, True]
    assert as_list(out["b"]) == [True, True, True]
    # with b first, its two cells fit and a's do not
    out = solve_masks(reqs[::-1])
    assert as_list(out["b"]) == [False, False, True]
    assert as_list(out["a"]) == [True, True]


def test_global_with_bounds():
    # a holds all the small values; max_sparse_ratio caps it at 1 of 4 cells and b's
    # min_sparse_ratio forces 2 of its cells out whatever their metric.
    reqs = [
        MaskRequest(key="a", metric=metric([0.1, 0.2, 0.3, 0.4]), sparse_ratio=0.5,
                    max_sparse_ratio=0.25, global_group_id="g"),
        MaskRequest(key="b", metric=metric([0.9, 0.5, 0.8, 0.7]), sparse_ratio=0.5,
                    min_sparse_ratio=0.5, global_group_id="g"),
    ]
    out = solve_masks(reqs)
    # budget 4 cells: a's 0.1 (cap 1), b's mandatory 0.5 and 0.7, then b's 0.8
    assert as_list(out["a"]) == [False, True, True, True]
    assert as_list(out["b"]) == [True, False, False, False]


group_case = st.lists(
    st.tuples(
        st.lists(st.integers(0, 5).map(float), min_size=1, max_size=6),
        st.integers(1, 4),
        st.sampled_from([None, 0.0, 0.2, 0.5]),
        st.sampled_from([None, 0.4, 0.7, 1.0]),
    ),
    min_size=1,
    max_size=4,
)


def global_requests(case, ratio, equal_numel=False):
    reqs = []
    for i, (values, numel, lo, hi) in enumerate(case):
        if lo is not None and hi is not None and lo > hi:
            lo, hi = hi, lo
        reqs.append(
            MaskRequest(key=i, metric=metric(values), block_numel=1 if equal_numel else numel,
                        sparse_ratio=ratio, min_sparse_ratio=lo, max_sparse_ratio=hi,
                        global_group_id="g")
        )
    return reqs


@SETTINGS
@given(case=group_case, ratio=ratios, pivots=st.sampled_from([1, 2, 3, 2048]))
def test_global_matches_greedy_reference(case, ratio, pivots):
    reqs = global_requests(case, ratio)
    with pytest.MonkeyPatch.context() as mp:
        # Few pivots force the multi-round search of the bounded / mixed-size path.
        mp.setattr(masks, "_PIVOTS", pivots)
        mp.setattr(masks, "_PIVOTS_PER_TARGET", 0)
        out = solve_masks(reqs)
    expected = ref_global(
        [r.metric.tolist() for r in reqs],
        [r.block_numel for r in reqs],
        ratio,
        [ref_bounds(r.metric.numel(), r.min_sparse_ratio, r.max_sparse_ratio) for r in reqs],
    )
    assert [as_list(out[i]) for i in range(len(reqs))] == expected


@SETTINGS
@given(case=group_case, ratio=ratios)
def test_global_equal_sizes_is_optimal(case, ratio):
    # With equal cell sizes the greedy must reach the true optimum: the most cells the budget and
    # the bounds allow, with the least summed metric. Enumerate every feasible per-target count.
    reqs = global_requests(case, ratio, equal_numel=True)
    out = solve_masks(reqs)
    values = [sorted(r.metric.tolist()) for r in reqs]
    bounds = [ref_bounds(len(v), r.min_sparse_ratio, r.max_sparse_ratio)
              for v, r in zip(values, reqs)]
    budget = ref_floor(sum(len(v) for v in values) * ratio)
    target = max(sum(lo for lo, _ in bounds), min(sum(hi for _, hi in bounds), budget))
    best = min(
        sum(sum(v[:c]) for v, c in zip(values, counts))
        for counts in itertools.product(*(range(lo, hi + 1) for lo, hi in bounds))
        if sum(counts) == target
    )
    pruned = [v for r in reqs for v, k in zip(r.metric.tolist(), as_list(out[r.key])) if not k]
    assert len(pruned) == target
    assert sum(pruned) == pytest.approx(best)


def test_global_group_errors():
    m = metric([1.0, 2.0])
    with pytest.raises(ValueError, match=r"global group 'g'.*request 'b' uses sparse_threshold"):
        solve_masks([
            MaskRequest(key="a", metric=m, sparse_ratio=0.5, global_group_id="g"),
            MaskRequest(key="b", metric=m, sparse_threshold=0.5, global_group_id="g"),
        ])
    with pytest.raises(ValueError, match="global group 'g': all requests need the same sparse_"):
        solve_masks([
            MaskRequest(key="a", metric=m, sparse_ratio=0.5, global_group_id="g"),
            MaskRequest(key="b", metric=m, sparse_ratio=0.6, global_group_id="g"),
        ])


# ----------------------------------------------------------------------------------------------
# solve_masks: dependency groups and internal_metric_block
# ----------------------------------------------------------------------------------------------


def test_dependency_group_uses_mean_metric_and_shares_mask():
    a = metric([0.9, 0.1, 0.5, 0.3])
    b = metric([0.1, 0.9, 0.4, 0.5])
    # mean: [0.5, 0.5, 0.45, 0.4] -> prune the two smallest means (indices 3 and 2)
    out = solve_masks([
        MaskRequest(key="a", metric=a, sparse_ratio=0.5, dependency_group_id="d"),
        MaskRequest(key="b", metric=b, sparse_ratio=0.5, dependency_group_id="d"),
        MaskRequest(key="c", metric=a, sparse_ratio=0.5),
    ])
    assert as_list(out["a"]) == [True, True, False, False]
    assert torch.equal(out["a"], out["b"])
    assert as_list(out["c"]) == [True, False, True, False]
    out["a"][0] = False  # each key owns its tensor
    assert bool(out["b"][0])


def test_dependency_group_threshold_and_2d_grid():
    a = metric([[1.0, 4.0], [2.0, 0.0]])
    b = metric([[3.0, 1.0], [2.0, 1.0]])
    # mean [[2, 2.5], [2, 0.5]] < 2.2 -> all but (0, 1) (a sum would prune only (1, 1))
    out = solve_masks([
        MaskRequest(key="a", metric=a, sparse_threshold=2.2, dependency_group_id=7),
        MaskRequest(key="b", metric=b, sparse_threshold=2.2, dependency_group_id=7),
    ])
    assert out["a"].tolist() == [[False, True], [False, False]]
    assert out["b"].tolist() == out["a"].tolist()


def test_dependency_group_in_global_group_counts_member_elements():
    # The dependency pair forms one virtual target of 2 cells x (2 + 2) elements, ranked together
    # with c (4 cells x 1 element). Elements 8 + 4 = 12; budget floor(12 * 0.5) = 6.
    # Ascending: c0 0.05 (1) -> 1; pair cell 1 mean 0.1 (4) -> 5; c1 0.3 (1) -> 6; stop.
    out = solve_masks([
        MaskRequest(key="a", metric=metric([0.6, 0.0]), block_numel=2, sparse_ratio=0.5,
                    dependency_group_id="d", global_group_id="g"),
        MaskRequest(key="b", metric=metric([0.8, 0.2]), block_numel=2, sparse_ratio=0.5,
                    dependency_group_id="d", global_group_id="g"),
        MaskRequest(key="c", metric=metric([0.05, 0.3, 0.9, 0.95]), sparse_ratio=0.5,
                    global_group_id="g"),
    ])
    assert as_list(out["a"]) == [True, False]
    assert as_list(out["b"]) == [True, False]
    assert as_list(out["c"]) == [False, False, True, True]


def test_dependency_group_cell_size_is_sum_of_members():
    # Pair cells weigh 2 + 2 = 4 elements; total 2 * 4 + 4 * 1 = 12, budget floor(12 * 0.4) = 4.
    # Ascending: pair cell 1 (mean 0.0, 4) -> 4; c0 (0.1, 1) would make 5: stop.
    # (Counting only one member's 2 elements would give budget 3 and prune c0 as well.)
    out = solve_masks([
        MaskRequest(key="a", metric=metric([0.9, 0.0]), block_numel=2, sparse_ratio=0.4,
                    dependency_group_id="d", global_group_id="g"),
        MaskRequest(key="b", metric=metric([0.9, 0.0]), block_numel=2, sparse_ratio=0.4,
                    dependency_group_id="d", global_group_id="g"),
        MaskRequest(key="c", metric=metric([0.1, 0.2, 0.3, 0.4]), sparse_ratio=0.4,
                    global_group_id="g"),
    ])
    assert as_list(out["a"]) == as_list(out["b"]) == [True, False]
    assert as_list(out["c"]) == [True, True, True, True]


def test_dependency_group_uses_first_members_clamps():
    out = solve_masks([
        MaskRequest(key="a", metric=metric([1.0, 2.0, 3.0, 4.0]), sparse_ratio=0.75,
                    max_sparse_ratio=0.25, dependency_group_id="d"),
        MaskRequest(key="b", metric=metric([1.0, 2.0, 3.0, 4.0]), sparse_ratio=0.75,
                    dependency_group_id="d"),
    ])
    assert as_list(out["b"]) == [False, True, True, True]


@pytest.mark.parametrize(
    ("second", "message"),
    [
        (dict(metric=torch.zeros(3)),
         r"dependency group 'd': metric shapes differ.*\(4,\).*\(3,\)"),
        (dict(sparse_ratio=0.25), "dependency group 'd': sparse_ratio differs"),
        (dict(sparse_ratio=None, sparse_threshold=0.5),
         "dependency group 'd': sparse_ratio differs"),
        (dict(global_group_id="other"), "dependency group 'd': global_group_id differs"),
        (dict(internal_metric_block=2), "dependency group 'd': internal_metric_block differs"),
    ],
)
def test_dependency_group_errors(second, message):
    base = dict(key="b", metric=torch.zeros(4), sparse_ratio=0.5, dependency_group_id="d")
    base.update(second)
    with pytest.raises(ValueError, match=message):
        solve_masks([
            MaskRequest(key="a", metric=torch.zeros(4), sparse_ratio=0.5, dependency_group_id="d"),
            MaskRequest(**base),
        ])


def test_internal_metric_block_prunes_whole_chunks():
    # 3 heads of 2 channels: head means 0.5, 0.15, 0.6 -> ratio 0.5 of 3 heads prunes 1 head
    m = metric([0.2, 0.8, 0.1, 0.2, 0.9, 0.3])
    assert solve_one(list(m.tolist()), sparse_ratio=0.5, internal_metric_block=2) == [
        True, True, False, False, True, True,
    ]
    # threshold on head means
    assert solve_one(list(m.tolist()), sparse_threshold=0.55, internal_metric_block=2) == [
        False, False, False, False, True, True,
    ]


@SETTINGS
@given(
    heads=st.lists(
        st.lists(st.integers(0, 4).map(float), min_size=3, max_size=3), min_size=1, max_size=6
    ),
    ratio=ratios,
)
def test_internal_metric_block_matches_reference(heads, ratio):
    values = [v for head in heads for v in head]
    head_means = [sum(h) / 3 for h in heads]
    keep_heads = ref_keep(head_means, ref_floor(len(heads) * ratio))
    expected = [k for k in keep_heads for _ in range(3)]
    assert solve_one(values, sparse_ratio=ratio, internal_metric_block=3) == expected


def test_internal_metric_block_in_global_group_multiplies_block_numel():
    # a: 2 heads x 2 channels x 3 elements = 12 elements, b: 4 cells x 1 element.
    # budget floor(16 * 0.5) = 8. Ascending: b0 0.0 (1) -> 1; head a0 mean 0.1 (6) -> 7;
    # b1 0.2 (1) -> 8; stop.
    out = solve_masks([
        MaskRequest(key="a", metric=metric([0.0, 0.2, 0.9, 0.9]), block_numel=3, sparse_ratio=0.5,
                    internal_metric_block=2, global_group_id="g"),
        MaskRequest(key="b", metric=metric([0.0, 0.2, 0.5, 0.6]), sparse_ratio=0.5,
                    global_group_id="g"),
    ])
    assert as_list(out["a"]) == [False, False, True, True]
    assert as_list(out["b"]) == [False, False, True, True]


def test_internal_metric_block_chunk_weighs_all_its_elements():
    # a: heads of 2 channels x 3 elements = 6 elements; total 12 + 8 = 20, budget
    # floor(20 * 0.3) = 6. Head 0 (mean 0.0, 6) -> 6; b0 (0.1) would make 7: stop.
    out = solve_masks([
        MaskRequest(key="a", metric=metric([0.0, 0.0, 0.9, 0.9]), block_numel=3, sparse_ratio=0.3,
                    internal_metric_block=2, global_group_id="g"),
        MaskRequest(key="b", metric=metric([0.1 * i for i in range(1, 9)]), sparse_ratio=0.3,
                    global_group_id="g"),
    ])
    assert as_list(out["a"]) == [False, False, True, True]
    assert as_list(out["b"]) == [True] * 8


def test_internal_metric_block_with_dependency_group():
    out = solve_masks([
        MaskRequest(key="q", metric=metric([0.1, 0.1, 0.9, 0.9]), sparse_ratio=0.5,
                    internal_metric_block=2, dependency_group_id="attn"),
        MaskRequest(key="k", metric=metric([0.9, 0.9, 0.3, 0.3]), sparse_ratio=0.5,
                    internal_metric_block=2, dependency_group_id="attn"),
    ])
    # mean per channel [0.5, 0.5, 0.6, 0.6] -> head 0 goes
    assert as_list(out["q"]) == as_list(out["k"]) == [False, False, True, True]


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(), "request 'w': set exactly one of sparse_ratio and sparse_threshold"),
        (dict(sparse_ratio=0.5, sparse_threshold=0.1), "request 'w': set exactly one"),
        (dict(sparse_ratio=1.5), r"request 'w': sparse_ratio must be a number in \[0, 1\]"),
        (dict(sparse_ratio=float("nan")), "request 'w': sparse_ratio must be"),
        (dict(sparse_threshold=float("nan")), "request 'w': sparse_threshold must be a number"),
        (dict(sparse_ratio=0.5, min_sparse_ratio=-0.1), "request 'w': min_sparse_ratio must be"),
        (dict(sparse_ratio=0.5, max_sparse_ratio=2), "request 'w': max_sparse_ratio must be"),
        (dict(sparse_ratio=0.5, min_sparse_ratio=0.6, max_sparse_ratio=0.5),
         "request 'w': min_sparse_ratio 0.6 is greater than max_sparse_ratio 0.5"),
        (dict(sparse_ratio=0.5, block_numel=0), "request 'w': block_numel must be an int >= 1"),
        (dict(sparse_ratio=0.5, internal_metric_block=4),
         "request 'w': internal_metric_block 4 does not divide the 6 cells"),
        (dict(sparse_ratio=0.5, internal_metric_block=0),
         "internal_metric_block must be an int >= 1"),
        (dict(sparse_ratio=0.5, metric=torch.zeros(2, 3), internal_metric_block=3),
         r"request 'w': internal_metric_block needs a 1-D metric grid.*\(2, 3\)"),
        (dict(sparse_ratio=0.5, metric=torch.zeros(6, dtype=torch.int64)),
         "request 'w': metric must be floating point"),
        (dict(sparse_ratio=0.5, metric=[0.0, 1.0]), "request 'w': metric must be a torch.Tensor"),
    ],
)
def test_request_validation(kwargs, message):
    kwargs = {"metric": torch.zeros(6), **kwargs}
    with pytest.raises(ValueError, match=message):
        MaskRequest(key="w", **kwargs)


def test_solve_validation():
    with pytest.raises(ValueError, match="request key 'w' appears more than once"):
        solve_masks([
            MaskRequest(key="w", metric=torch.zeros(2), sparse_ratio=0.5),
            MaskRequest(key="w", metric=torch.zeros(2), sparse_ratio=0.5),
        ])
    with pytest.raises(ValueError, match="request 'n': metric contains NaN"):
        solve_masks([MaskRequest(key="n", metric=metric([1.0, float("nan")]), sparse_ratio=0.5)])
    with pytest.raises(ValueError, match="expected MaskRequest objects; got dict"):
        solve_masks([{"key": "w"}])
    with pytest.raises(ValueError, match="must be hashable"):
        MaskRequest(key=["w"], metric=torch.zeros(2), sparse_ratio=0.5)


def test_request_equality_compares_metric_values():
    a = MaskRequest(key="w", metric=metric([1.0, 2.0]), sparse_ratio=0.5)
    assert a == MaskRequest(key="w", metric=metric([1.0, 2.0]), sparse_ratio=0.5)
    assert a != MaskRequest(key="w", metric=metric([1.0, 3.0]), sparse_ratio=0.5)
    assert hash(a) == hash(MaskRequest(key="w", metric=metric([1.0, 2.0]), sparse_ratio=0.5))


def test_result_order_and_infinite_metrics():
    out = solve_masks([
        MaskRequest(key="z", metric=metric([float("inf"), 1.0, float("-inf")]), sparse_ratio=0.34),
        MaskRequest(key="a", metric=metric([1.0]), sparse_ratio=0.0),
    ])
    assert list(out) == ["z", "a"]
    assert as_list(out["z"]) == [True, True, False]


# ----------------------------------------------------------------------------------------------
# align_mask
# ----------------------------------------------------------------------------------------------


def ref_align(full: torch.Tensor, dims: list[int], target_shape) -> torch.Tensor:
    ndim = full.ndim
    dims = [d % ndim for d in dims]
    out = []
    for idx in itertools.product(*(range(full.shape[d]) for d in dims)):
        any_kept = False
        for pos in itertools.product(*(range(s) for s in full.shape)):
            if all(pos[d] == i for d, i in zip(dims, idx)) and bool(full[pos]):
                any_kept = True
        out.append(any_kept)
    return torch.tensor(out, dtype=torch.bool).reshape(target_shape)


def test_align_linear_bias():
    weight_mask = torch.tensor([[True, False, False], [False, False, False], [False, True, True],
                                [False, False, False]])
    assert align_mask(weight_mask, (4, 3), [0], (4,)).tolist() == [True, False, True, False]
    assert align_mask(weight_mask, (4, 3), [1], (3,)).tolist() == [True, True, True]
    assert align_mask(weight_mask, (4, 3), [-2], (4,)).tolist() == [True, False, True, False]


def test_align_compact_source_mask():
    compact = torch.tensor([True, False, True, False]).reshape(4, 1, 1, 1)
    assert align_mask(compact, (4, 2, 3, 3), [0], (4,)).tolist() == [True, False, True, False]
    # along dim 1 every input channel still has a kept element somewhere
    assert align_mask(compact, (4, 2, 3, 3), [1], (2,)).tolist() == [True, True]
    in_channel = torch.tensor([False, True]).reshape(1, 2, 1, 1)
    assert align_mask(in_channel, (4, 2, 3, 3), [1], (2,)).tolist() == [False, True]
    assert align_mask(in_channel, (4, 2, 3, 3), [0], (4,)).tolist() == [True] * 4


def test_align_one_dimensional_source():
    bn_weight = torch.tensor([True, False, True])
    assert align_mask(bn_weight, (3,), [0], (3,)).tolist() == [True, False, True]
    assert align_mask(bn_weight, (3,), [-1], (3, 1)).tolist() == [[True], [False], [True]]


@SETTINGS
@given(
    case=st.sampled_from([
        ((2, 3, 4), [0], (2,)),
        ((2, 3, 4), [2], (4,)),
        ((2, 3, 4), [0, 2], (2, 4)),
        ((2, 3, 4), [2, 0], (8,)),
        ((2, 3, 4), [-1, 1], (4, 3)),
        ((2, 3, 4), [], (1,)),
        ((5,), [0], (5,)),
    ]),
    compact_dims=st.sets(st.integers(0, 2)),
    seed=st.integers(0, 1000),
)
def test_align_matches_reference(case, compact_dims, seed):
    shape, dims, target = case
    mask_shape = tuple(1 if d in compact_dims else s for d, s in enumerate(shape))
    # low keep probability so that whole slices are often pruned
    mask = torch.rand(mask_shape, generator=torch.Generator().manual_seed(seed)) < 0.15
    got = align_mask(mask, shape, dims, target)
    assert got.dtype == torch.bool
    assert torch.equal(got, ref_align(mask.expand(shape), dims, target))


@pytest.mark.parametrize(
    ("mask_shape", "dims", "target", "message"),
    [
        ((4, 3), [0], (3,),
         "target shape (3,) has 3 elements but dims [0] of source shape (4, 3) give 4"),
        ((4, 3), [2], (4,), "dim 2 is out of range for source shape (4, 3)"),
        ((4, 3), [0, -2], (16,), "dim 0 appears more than once"),
        ((2, 3), [0], (4,), "source mask of shape (2, 3) does not broadcast to (4, 3)"),
    ],
)
def test_align_errors(mask_shape, dims, target, message):
    with pytest.raises(ValueError) as info:
        align_mask(torch.ones(mask_shape, dtype=torch.bool), (4, 3), dims, target)
    assert message in str(info.value)
    with pytest.raises(ValueError, match="source mask must be bool"):
        align_mask(torch.ones(4, 3), (4, 3), [0], (4,))


# ----------------------------------------------------------------------------------------------
# apply_mask
# ----------------------------------------------------------------------------------------------


def test_apply_mask_mul_values_dtype_and_gradient():
    t = torch.tensor([[1.0, -2.0], [3.0, float("inf")]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, False], [True, False]])
    out = apply_mask(t, mask, "mul")
    assert out.dtype == torch.float64
    assert out.tolist() == [[1.0, 0.0], [3.0, 0.0]]  # a pruned inf becomes 0, not NaN
    out.sum().backward()
    assert t.grad.tolist() == [[1.0, 0.0], [1.0, 0.0]]


def test_apply_mask_add_values_and_gradient():
    t = torch.tensor([0.5, 2.0, -1.0], requires_grad=True)
    out = apply_mask(t, torch.tensor([True, False, False]), "add")
    assert MASK_ADD_VALUE == -1000.0
    assert out.tolist() == [0.5, 2.0 + MASK_ADD_VALUE, -1.0 + MASK_ADD_VALUE]
    assert out.dtype == torch.float32
    (out * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert t.grad.tolist() == [1.0, 2.0, 3.0]
    # after softmax the pruned scores vanish
    probs = torch.softmax(out.detach(), dim=0)
    assert probs[0] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32]
)
def test_apply_mask_keeps_values_exactly_in_every_dtype(dtype):
    values = [-0.0, 1.5, float("nan"), -3.0, float("inf"), 7.0]
    if not dtype.is_floating_point:
        values = [0, 2, -5, 9, 11, -1]
    t = torch.tensor(values, dtype=dtype)
    keep = torch.tensor([True, True, False, True, False, False])
    out = apply_mask(t, keep, "mul")
    assert out.dtype == dtype
    kept = [i for i, k in enumerate(keep.tolist()) if k]
    # bit-exact where kept (the sign of -0.0 included), exactly +0 where pruned (NaN/inf too)
    bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    assert torch.equal(out[kept].view(bits), t[kept].view(bits))
    assert out[~keep].tolist() == [0, 0, 0]
    assert not torch.signbit(out[~keep].float()).any()
    if dtype.is_floating_point:
        added = apply_mask(t, keep, "add")
        assert added.dtype == dtype
        assert torch.equal(added[kept].view(bits), t[kept].view(bits))
        expected = torch.tensor([float(v) + MASK_ADD_VALUE for v in t[~keep].tolist()]).to(dtype)
        torch.testing.assert_close(added[~keep], expected, rtol=0, atol=0, equal_nan=True)


def test_apply_mask_mul_second_order_gradient():
    t = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    keep = torch.tensor([True, False, True])
    (grad,) = torch.autograd.grad((apply_mask(t, keep, "mul") ** 2).sum(), t, create_graph=True)
    assert grad.tolist() == [2.0, 0.0, 6.0]
    grad.sum().backward()
    assert t.grad.tolist() == [2.0, 0.0, 2.0]


def test_apply_mask_compact_mask_broadcasts():
    t = torch.arange(12.0).reshape(3, 2, 2)
    out = apply_mask(t, torch.tensor([True, False, True]).reshape(3, 1, 1), "mul")
    assert out.tolist() == [[[0.0, 1.0], [2.0, 3.0]], [[0.0, 0.0], [0.0, 0.0]],
                            [[8.0, 9.0], [10.0, 11.0]]]
    assert out.dtype == torch.float32 and out.shape == t.shape


@pytest.mark.parametrize(
    ("mask", "method", "message"),
    [
        (torch.ones(3, dtype=torch.bool), "max", "unknown mask method 'max'"),
        (torch.ones(3), "mul", "mask must be bool"),
        (torch.ones(2, 3, dtype=torch.bool), "mul", r"mask of shape \(2, 3\) does not broadcast"),
    ],
)
def test_apply_mask_errors(mask, method, message):
    with pytest.raises(ValueError, match=message):
        apply_mask(torch.zeros(3), mask, method)
