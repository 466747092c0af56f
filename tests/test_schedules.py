"""``linear`` and ``agp`` schedules around other pruning methods: masks at every step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import compress_core
from compress_core import ConfigError
from compress_core.wrapper import get_wrapper


def eight_rows() -> nn.Sequential:
    layer = nn.Linear(2, 8)
    with torch.no_grad():
        # Row sums of |w| 1..8, shuffled so the pruned rows are not simply a prefix.
        sums = torch.tensor([5.0, 1.0, 7.0, 3.0, 8.0, 2.0, 6.0, 4.0])
        layer.weight.copy_(torch.stack([sums, torch.zeros(8)], 1))
    return nn.Sequential(layer)


def pruned_rows(model: nn.Sequential) -> list[int]:
    mask = model[0].weight__pruning_mask.expand(8, 2)[:, 0]
    return sorted(int(i) for i in torch.nonzero(~mask))


# Rows in ascending order of their metric (row sums 1, 2, 3, ...).
ASCENDING = [1, 5, 3, 7, 0, 6, 2, 4]


@pytest.mark.parametrize(
    "method,counts",
    [
        # interval 2, 3 updates, ratio 0.75 of 8 rows: update u prunes floor(6 * f(u / 3)).
        # linear f(x) = x: 2, 4, 6.
        ("linear", [0, 0, 2, 2, 4, 4, 6, 6, 6]),
        # agp f(x) = 1 - (1 - x)^3: 6 * 19/27 = 4.2 -> 4, 6 * 26/27 = 5.8 -> 5, then 6.
        ("agp", [0, 0, 4, 4, 5, 5, 6, 6, 6]),
        ("LinearPruner", [0, 0, 2, 2, 4, 4, 6, 6, 6]),
    ],
)
def test_masks_at_each_step(method, counts):
    model = eight_rows()
    config = [{"op_types": ["Linear"], "sparse_ratio": 0.75}]
    comp = compress_core.create(method, model, config, pruner="l1_norm", interval_steps=2, total_times=3)
    assert pruned_rows(model) == []
    for step, count in enumerate(counts[1:], 1):
        comp.step()
        assert pruned_rows(model) == sorted(ASCENDING[:count]), step
    assert pruned_rows(model) == sorted(ASCENDING[:6])
    masks = comp.compress()
    assert torch.equal(masks["0"]["bias"], masks["0"]["weight"][:, 0])


def test_compress_returns_the_full_ratio_even_mid_schedule():
    model = eight_rows()
    comp = compress_core.create("agp", model, [{"op_types": ["Linear"], "sparse_ratio": 0.5}],
                                pruner="level", interval_steps=10, total_times=5)
    comp.step()
    masks = comp.compress()
    # level is element-wise: 8 of the 16 weights go, which here are the 8 zeros.
    assert int((~masks["0"]["weight"]).sum()) == 8
    assert torch.equal(masks["0"]["weight"][:, 1], torch.zeros(8, dtype=torch.bool))


def test_min_sparse_ratio_is_scaled_with_the_ratio():
    model = eight_rows()
    config = [{"op_types": ["Linear"], "sparse_ratio": 0.75, "min_sparse_ratio": 0.5}]
    comp = compress_core.create("linear", model, config, pruner="l2_norm", interval_steps=1, total_times=2)
    comp.step()
    # Half way: ratio 0.375 -> 3 rows, min 0.25 -> 2: the bound does not force 4 rows early.
    assert pruned_rows(model) == sorted(ASCENDING[:3])


def test_schedule_passes_method_parameters_and_taylor_recollects_after_each_update():
    model = nn.Sequential(nn.Linear(2, 4, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.ones(4, 2))
    config = [{"op_types": ["Linear"], "sparse_ratio": 0.5}]
    comp = compress_core.create("linear", model, config, pruner="taylor", training_steps=5,
                                interval_steps=1, total_times=2)
    assert comp.pruner.params.training_steps == 5
    x = torch.ones(1, 2)
    # Step 1: only rows 0 and 1 get gradient, row 0 most -> ratio 0.25 prunes row 2 (first tie).
    (model(x) * torch.tensor([2.0, 1.0, 0.0, 0.0])).sum().backward()
    comp.step()
    assert torch.equal(model[0].weight__pruning_mask[:, 0], torch.tensor([True, True, False, True]))
    model[0].weight.grad = None
    # Step 2: fresh importance only (rows 3 > 1 > 0): ratio 0.5 prunes rows 0 and 2.
    (model(x) * torch.tensor([1.0, 2.0, 0.0, 3.0])).sum().backward()
    comp.step()
    assert torch.equal(model[0].weight__pruning_mask[:, 0], torch.tensor([False, True, False, True]))


def test_schedule_of_a_training_aware_method_exposes_its_parameters():
    model = nn.Sequential(nn.Linear(2, 4))
    comp = compress_core.create("agp", model, [{"op_types": ["Linear"], "sparse_ratio": 0.5}],
                                pruner="slim", regular_scale=0.25, interval_steps=1, total_times=1)
    (factor,) = list(comp.parameters())
    assert factor.shape == (4, 1)
    assert comp.loss().item() == pytest.approx(0.25 * 4)


@pytest.mark.parametrize(
    "params,key,text",
    [
        ({}, "pruner", "needs pruner"),
        ({"pruner": "wanda"}, "pruner", "unknown method"),
        ({"pruner": "agp"}, "pruner", "is a schedule"),
        ({"pruner": "qat"}, "pruner", "quantization method"),
        ({"pruner": "l1_norm", "interval_steps": 0}, "interval_steps", "integer >= 1"),
        ({"pruner": "taylor", "training_steps": -1}, "training_steps", "integer >= 1"),
        ({"pruner": "l1_norm", "training_steps": 3}, "training_steps", "no parameter"),
    ],
)
def test_bad_schedule_parameters_are_config_errors(params, key, text):
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ConfigError, match=text) as info:
        compress_core.create("linear", model, [{"op_types": ["Linear"], "sparse_ratio": 0.5}], **params)
    assert info.value.key == key
    assert get_wrapper(model[0]) is None


def test_a_schedule_replaces_movements_own_cubic_schedule():
    model = eight_rows()
    comp = compress_core.create("linear", model, [{"op_types": ["Linear"], "sparse_ratio": 0.5}],
                                pruner="movement", warmup_step=0, cooldown_begin_step=100,
                                interval_steps=1, total_times=2)
    (scores,) = list(comp.parameters())
    with torch.no_grad():
        scores.copy_(torch.arange(8.0).view(8, 1))
    comp.step()
    # linear: 8 * 0.5 * 1/2 = 2 rows (movement alone would be at 8 * 0.5 * 0.03 -> 0).
    assert pruned_rows(model) == [0, 1]
    comp.step()
    assert pruned_rows(model) == [0, 1, 2, 3]
