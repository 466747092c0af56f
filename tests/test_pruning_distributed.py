"""Data-dependent pruning statistics are reduced across torch.distributed ranks.

Two gloo processes on CPU see different data; both must end with the same masks, equal to the
masks of the reduced statistic worked out here by hand (or, for observed activations, to one
process that saw the union of the data).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import compress_core

WEIGHT = torch.tensor([[1.0, 2.0, 0.5, 0.0], [2.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5],
                       [3.0, 0.0, 0.0, 1.0], [0.0, 1.0, 2.0, 0.0], [1.0, 1.0, 1.0, 3.0]])
COEFF = torch.tensor([1.0, -1.0, 2.0, 0.5, -0.5, 1.5])
# Each rank's batch: rank 0 drives the first inputs, rank 1 the last ones.
DATA = [
    torch.tensor([[2.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]),
    torch.tensor([[0.0, 0.0, 1.0, 3.0], [0.0, 0.0, 2.0, 0.0]]),
]
ACTIVATIONS = [
    torch.tensor([[4.0, 0.0, 1.0, 0.2], [4.0, 0.0, 1.0, 0.2]]),
    torch.tensor([[0.0, 3.0, 1.0, 0.2], [0.0, 0.0, 1.0, 0.2], [0.0, 3.0, 1.0, 0.2]]),
]
CONFIG = [{"op_names": ["0"], "sparse_ratio": 0.5}]


def model() -> nn.Sequential:
    layer = nn.Linear(4, 6, bias=False)
    with torch.no_grad():
        layer.weight.copy_(WEIGHT)
    return nn.Sequential(layer, nn.Identity())


def run_taylor(x: torch.Tensor) -> torch.Tensor:
    m = model()
    comp = compress_core.create("taylor", m, CONFIG, training_steps=1)
    (m(x) * COEFF).sum().backward()
    comp.step()
    return comp.compress()["0"]["weight"][:, 0]


def run_movement(x: torch.Tensor) -> torch.Tensor:
    m = model()
    comp = compress_core.create("movement", m, CONFIG, warmup_step=0, cooldown_begin_step=1)
    optimizer = torch.optim.SGD(list(comp.parameters()), lr=1.0)
    (m(x) * COEFF).sum().backward()
    optimizer.step()
    comp.step()
    return comp.compress()["0"]["weight"][:, 0]


def run_slim(x: torch.Tensor) -> torch.Tensor:
    m = model()
    comp = compress_core.create("slim", m, CONFIG, regular_scale=0.0)
    optimizer = torch.optim.SGD(list(comp.parameters()), lr=0.1)
    (m(x) * COEFF).sum().backward()
    optimizer.step()
    comp.step()
    return comp.compress()["0"]["weight"][:, 0]


def run_activations(batches: list[torch.Tensor]) -> torch.Tensor:
    m = model()
    config = [{"op_names": ["1"], "target_names": ["_input_"], "sparse_ratio": 0.5}]
    comp = compress_core.create("l1_norm", m, config)
    for batch in batches:
        m[1](batch)
    return comp.compress()["1"]["_input_0"]


def worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        result = {
            "taylor": run_taylor(DATA[rank]),
            "movement": run_movement(DATA[rank]),
            "slim": run_slim(DATA[rank]),
            "activations": run_activations([ACTIVATIONS[rank]]),
        }
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def keep_top(metric: torch.Tensor, count: int) -> torch.Tensor:
    keep = torch.zeros(metric.numel(), dtype=torch.bool)
    keep[torch.argsort(metric, descending=True)[:count]] = True
    return keep


@pytest.mark.slow
def test_two_gloo_ranks_end_with_the_masks_of_the_reduced_statistics(tmp_path):
    mp.spawn(worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name in ("taylor", "movement", "slim", "activations"):
        assert torch.equal(results[0][name], results[1][name]), name

    # dL/dW[i, j] = COEFF[i] * sum_n x[n, j] on each rank.
    grads = [COEFF[:, None] * x.sum(0)[None, :] for x in DATA]
    taylor = sum(((WEIGHT * g) ** 2).sum(1) for g in grads) / 2
    assert torch.equal(results[0]["taylor"], keep_top(taylor, 3))
    # A rank alone would rank differently: the reduction matters.
    assert not torch.equal(keep_top(((WEIGHT * grads[0]) ** 2).sum(1), 3), keep_top(taylor, 3))

    # One SGD step (lr 1) on the scores from 0: score_i = -sum_j w_ij * g_ij, averaged.
    scores = -sum((WEIGHT * g).sum(1) for g in grads) / 2
    assert torch.equal(results[0]["movement"], keep_top(scores, 3))
    assert not torch.equal(keep_top(-(WEIGHT * grads[0]).sum(1), 3), keep_top(scores, 3))

    # Slim: factor_i = 1 - 0.1 * sum_j w_ij * g_ij after one SGD step, averaged; metric |f|.
    factors = (1 - 0.1 * sum((WEIGHT * g).sum(1) for g in grads) / 2).abs()
    assert torch.equal(results[0]["slim"], keep_top(factors, 3))
    assert not torch.equal(keep_top((1 - 0.1 * (WEIGHT * grads[0]).sum(1)).abs(), 3), keep_top(factors, 3))

    # Observed mean |x| over the union of the rows: 1.6, 1.2, 1, 0.2 (rank 0 alone: 4, 0, 1, 0.2).
    union = run_activations(ACTIVATIONS)
    assert torch.equal(union, torch.tensor([True, True, False, False]))
    assert torch.equal(results[0]["activations"], union)
