"""Time of computing pruning masks against the floor of doing it by hand.

Model: 5 x ``Linear(2000, 2000)`` without bias (20M weights). Method ``level`` (element-wise
``|w|``) at ``sparse_ratio`` 0.7, once with all five weights in one global group and once per
layer. The timed part is ``comp.compress()`` (``create`` only attaches; it computes nothing).

The floor is what any implementation has to do, measured in the same process on the same
weights: ``abs`` of every weight, one ``torch.kthvalue`` (over the concatenation for the global
case, per layer otherwise) and the ``<=`` comparison producing the masks. The ratio
``compress / floor`` is what the issue asks about (targets: <= 3x global, <= 2x per layer).

Each measurement is the median of ``--repeats`` runs, one thread (``torch.set_num_threads(1)``).
The script also prints the bytes per weight the masks take.

Usage::

    python benchmarks/masks.py
    python benchmarks/masks.py --repeats 7 --threads 1
    python benchmarks/masks.py --markdown   # a markdown table (for benchmarks/run_all.py)

Nothing is asserted: the script reports.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import compress_core

LAYERS = 5
WIDTH = 2000
RATIO = 0.7


def build_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(LAYERS)])


def config(global_group: bool) -> list[dict]:
    if global_group:
        return [{"op_types": ["Linear"], "sparse_ratio": RATIO, "global_group_id": "all"}]
    return [{"op_types": ["Linear"], "sparse_ratio": RATIO}]


def floor_global(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    flat = torch.cat([w.abs().reshape(-1) for w in weights])
    k = int(flat.numel() * RATIO)
    v = torch.kthvalue(flat, k).values
    return [w.abs() > v for w in weights]


def floor_per_layer(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    out = []
    for w in weights:
        a = w.abs()
        v = torch.kthvalue(a.reshape(-1), int(a.numel() * RATIO)).values
        out.append(a > v)
    return out


def median_time(fn: Callable[[], object], repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for name, global_group, floor in (
        ("global", True, floor_global),
        ("per-layer", False, floor_per_layer),
    ):
        model = build_model()
        weights = [m.weight.detach() for m in model]
        comp = compress_core.create("level", model, config(global_group))
        masks = comp.compress()
        pruned = sum(int((~masks[str(i)]["weight"]).sum()) for i in range(LAYERS))
        mask_bytes = sum(
            comp.model[i].weight__pruning_mask.element_size() * comp.model[i].weight__pruning_mask.numel()
            for i in range(LAYERS)
        )
        t_comp = median_time(comp.compress, args.repeats)
        t_floor = median_time(lambda f=floor, w=weights: f(w), args.repeats)
        rows.append((name, t_comp, t_floor, pruned / (LAYERS * WIDTH * WIDTH), mask_bytes / (LAYERS * WIDTH * WIDTH)))

    print(f"level, {LAYERS} x Linear({WIDTH}, {WIDTH}), sparse_ratio {RATIO}, {args.threads} thread(s), "
          f"median of {args.repeats}")
    if args.markdown:
        print()
        print("| case | compress() s | floor s | ratio | sparsity | mask bytes/element |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, t_comp, t_floor, sparsity, bpe in rows:
            print(f"| {name} | {t_comp:.3f} | {t_floor:.3f} | {t_comp / t_floor:.2f} | {sparsity:.4f} | {bpe:.2f} |")
        return
    print(f"{'case':<10} {'compress s':>11} {'floor s':>8} {'ratio':>6} {'sparsity':>9} {'mask B/elem':>12}")
    for name, t_comp, t_floor, sparsity, bpe in rows:
        print(f"{name:<10} {t_comp:>11.3f} {t_floor:>8.3f} {t_comp / t_floor:>6.2f} {sparsity:>9.4f} {bpe:>12.2f}")


if __name__ == "__main__":
    main()
