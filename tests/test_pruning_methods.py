"""Every built-in pruning method through ``create``: masks worked out by hand."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import compress_core
from compress_core import ConfigError
from compress_core.wrapper import get_wrapper


def linear_with(weight: list[list[float]], bias: bool = True) -> nn.Linear:
    w = torch.tensor(weight)
    layer = nn.Linear(w.shape[1], w.shape[0], bias=bias)
    with torch.no_grad():
        layer.weight.copy_(w)
        if bias:
            layer.bias.fill_(1.0)
    return layer


def rows(keep: list[bool], width: int) -> torch.Tensor:
    return torch.tensor(keep)[:, None].expand(len(keep), width)


# -- one-shot methods on parameters ----------------------------------------------------------


ROWS = [[3.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [5.0, 5.0, 5.0, 5.0], [0.5, 0.0, 0.0, 0.0]]


@pytest.mark.parametrize(
    "method,keep",
    [
        # Sums of |w|: 3, 4, 20, 0.5 -> rows 3 and 0 go.
        ("l1_norm", [False, True, True, False]),
        # L2 norms: 3, 2, 10, 0.5 -> rows 3 and 1 go.
        ("l2_norm", [True, False, True, False]),
        ("L1NormPruner", [False, True, True, False]),
    ],
)
def test_norm_methods_default_to_out_channel_and_mask_the_bias(method, keep):
    model = nn.Sequential(linear_with(ROWS))
    masks = compress_core.create(method, model, [{"op_types": ["Linear"], "sparse_ratio": 0.5}]).compress()
    assert torch.equal(masks["0"]["weight"], rows(keep, 4))
    assert torch.equal(masks["0"]["bias"], torch.tensor(keep))


def test_l1_in_channel_masks_columns():
    model = nn.Sequential(linear_with([[1.0, -2.0, 0.1], [1.0, 2.0, 0.1]]))
    config = [{"op_types": ["Linear"], "sparse_ratio": 0.34, "granularity": "in_channel"}]
    masks = compress_core.create("l1_norm", model, config).compress()
    # Column sums 2, 4, 0.2 -> floor(3 * 0.34) = 1 column, the last.
    assert torch.equal(masks["0"]["weight"], torch.tensor([[True, True, False], [True, True, False]]))
    assert torch.equal(masks["0"]["bias"], torch.tensor([True, True]))


def test_l2_block_granularity():
    model = nn.Sequential(linear_with([[3.0, 4.0, 1.0, 0.0], [0.0, 0.0, 6.0, 8.0]], bias=False))
    config = [{"op_types": ["Linear"], "sparse_ratio": 0.5, "granularity": [1, 2]}]
    masks = compress_core.create("l2_norm", model, config).compress()
    # Block norms: (0,0) 5, (0,1) 1, (1,0) 0, (1,1) 10 -> the 0 and 1 blocks go.
    expected = torch.tensor([[True, True, False, False], [False, False, True, True]])
    assert torch.equal(masks["0"]["weight"], expected)


def test_fpgm_prunes_the_filter_nearest_the_others_not_the_smallest():
    model = nn.Sequential(linear_with([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0]]))
    config = [{"op_types": ["Linear"], "sparse_ratio": 0.34}]
    masks = compress_core.create("fpgm", model, config).compress()
    # Sum of distances: row 0: 1 + 10 = 11, row 1: 1 + 9 = 10, row 2: 10 + 9 = 19.
    assert torch.equal(masks["0"]["bias"], torch.tensor([True, False, True]))
    l1 = compress_core.create("l1_norm", nn.Sequential(linear_with([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0]])), config)
    assert torch.equal(l1.compress()["0"]["bias"], torch.tensor([False, True, True]))


def test_fpgm_on_conv_filters_matches_a_float64_reference():
    torch.manual_seed(3)
    conv = nn.Conv2d(2, 6, 3)
    model = nn.Sequential(conv)
    w = conv.weight.detach().double().reshape(6, -1)
    distance = [sum(math.dist(w[i].tolist(), w[j].tolist()) for j in range(6)) for i in range(6)]
    pruned = sorted(range(6), key=lambda i: distance[i])[:3]
    expected = torch.tensor([i not in pruned for i in range(6)])
    masks = compress_core.create("fpgm", model, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}]).compress()
    assert torch.equal(masks["0"]["weight"][:, 0, 0, 0], expected)
    assert torch.equal(masks["0"]["weight"], expected[:, None, None, None].expand(6, 2, 3, 3))


# -- keys: threshold, clamps, groups, align, add -----------------------------------------------


THRESHOLD_ROWS = [[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0]]


@pytest.mark.parametrize(
    "extra,keep",
    [
        ({}, [False, False, True, True]),  # row sums 1, 2 < 2.5
        ({"min_sparse_ratio": 0.75}, [False, False, False, True]),  # at least 3 rows
        ({"max_sparse_ratio": 0.25}, [False, True, True, True]),  # at most 1 row
    ],
)
def test_l1_threshold_and_clamps(extra, keep):
    model = nn.Sequential(linear_with(THRESHOLD_ROWS))
    config = [{"op_types": ["Linear"], "sparse_threshold": 2.5, **extra}]
    masks = compress_core.create("l1_norm", model, config).compress()
    assert torch.equal(masks["0"]["bias"], torch.tensor(keep))


def test_global_group_with_a_per_target_bound():
    def model() -> nn.Sequential:
        return nn.Sequential(
            linear_with([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0]], bias=False),
            linear_with([[10.0, 0.0], [20.0, 0.0], [30.0, 0.0], [40.0, 0.0]], bias=False),
        )

    group = {"sparse_ratio": 0.5, "global_group_id": "g"}
    masks = compress_core.create("l2_norm", model(), [{"op_types": ["Linear"], **group}]).compress()
    # 8 rows, 4 go, all from the first layer.
    assert torch.equal(masks["0"]["weight"][:, 0], torch.tensor([False] * 4))
    assert torch.equal(masks["1"]["weight"][:, 0], torch.tensor([True] * 4))
    config = [{"op_names": ["0"], "max_sparse_ratio": 0.5, **group}, {"op_names": ["1"], **group}]
    masks = compress_core.create("l2_norm", model(), config).compress()
    # Layer 0 may lose only 2 rows; the group's other 2 come from layer 1's smallest.
    assert torch.equal(masks["0"]["weight"][:, 0], torch.tensor([False, False, True, True]))
    assert torch.equal(masks["1"]["weight"][:, 0], torch.tensor([False, False, True, True]))


def dependency_model() -> nn.Sequential:
    return nn.Sequential(
        linear_with([[1.0, 0.0], [8.0, 0.0], [3.0, 0.0], [4.0, 0.0]]),
        linear_with([[6.0, 0.0], [1.0, 0.0], [2.0, 0.0], [8.0, 0.0]]),
    )


def test_dependency_group_shares_one_mask_from_the_mean_metric():
    config = [{"op_types": ["Linear"], "sparse_ratio": 0.5, "dependency_group_id": 1}]
    masks = compress_core.create("l1_norm", dependency_model(), config).compress()
    # Mean row sums 3.5, 4.5, 2.5, 6 -> rows 2 and 0 go in both (layer 1 alone would drop 1, 2).
    keep = torch.tensor([False, True, False, True])
    assert torch.equal(masks["0"]["bias"], keep)
    assert torch.equal(masks["1"]["bias"], keep)


def test_internal_metric_block_prunes_whole_chunks():
    config = [{"op_types": ["Linear"], "sparse_ratio": 0.5, "dependency_group_id": 1, "internal_metric_block": 2}]
    masks = compress_core.create("l2_norm", dependency_model(), config).compress()
    # Mean norms 3.5, 4.5, 2.5, 6 -> chunk means 4.0 and 4.25: the first chunk goes.
    keep = torch.tensor([False, False, True, True])
    assert torch.equal(masks["0"]["bias"], keep)
    assert torch.equal(masks["1"]["bias"], keep)


def test_batchnorm_weight_and_bias_aligned_to_a_conv_pruned_by_fpgm():
    conv = nn.Conv2d(1, 3, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([0.0, 1.0, 10.0]).view(3, 1, 1, 1))
    model = nn.Sequential(conv, nn.BatchNorm2d(3))
    config = [
        {"op_names": ["0"], "sparse_ratio": 0.34},
        {
            "op_names": ["1"],
            "target_settings": {
                "weight": {"align": {"module_name": "0", "target_name": "weight", "dims": [0]}},
                "bias": {"align": {"target_name": "weight", "dims": [0]}},
            },
        },
    ]
    masks = compress_core.create("fpgm", model, config).compress()
    keep = torch.tensor([True, False, True])
    assert torch.equal(masks["1"]["weight"], keep)
    assert torch.equal(masks["1"]["bias"], keep)
    model.eval()
    out = model(torch.randn(2, 1, 2, 2))
    assert torch.count_nonzero(out[:, 1]) == 0


ACTIVATIONS = torch.tensor([[2.0, 0.6, 5.0, 0.0], [0.0, 0.6, 5.0, 0.0], [0.0, 0.6, 5.0, 0.0], [0.0, 0.6, 5.0, 0.1]])


@pytest.mark.parametrize(
    "method,keep",
    [
        ("l1_norm", [False, True, True, False]),  # mean |x|: 0.5, 0.6, 5, 0.025
        ("l2_norm", [True, False, True, False]),  # root mean square: 1, 0.6, 5, 0.05
    ],
)
def test_norm_methods_on_observed_inputs_with_add_masks(method, keep):
    model = nn.Sequential(nn.Identity())
    config = [{"op_names": ["0"], "target_names": ["_input_"], "sparse_ratio": 0.5, "apply_method": "add"}]
    comp = compress_core.create(method, model, config)
    model(ACTIVATIONS[:2])
    model(ACTIVATIONS[2:])  # two batches: the statistic is over all rows seen
    masks = comp.compress()
    keep_t = torch.tensor(keep)
    assert torch.equal(masks["0"]["_input_0"], keep_t)
    x = torch.ones(1, 4)
    assert torch.equal(model(x), torch.where(keep_t, 1.0, 1.0 - 1000.0)[None])


def test_fpgm_rejects_inputs_and_element_granularity_before_touching_the_model():
    model = nn.Sequential(nn.Linear(2, 2))
    bad_input = [{"op_names": ["0"], "target_names": ["_input_"], "sparse_ratio": 0.5}]
    with pytest.raises(ConfigError) as info:
        compress_core.create("fpgm", model, bad_input)
    assert info.value.module == "0" and "align" in str(info.value)
    with pytest.raises(ConfigError) as info:
        compress_core.create("fpgm", model, [{"op_names": ["0"], "sparse_ratio": 0.5, "granularity": "element"}])
    assert info.value.key.endswith("weight.granularity")
    assert get_wrapper(model[0]) is None


@pytest.mark.parametrize(
    "method,params,key",
    [
        ("taylor", {"training_steps": 0}, "training_steps"),
        ("movement", {"warmup_step": 5, "cooldown_begin_step": 5}, "cooldown_begin_step"),
        ("slim", {"regular_scale": -1.0}, "regular_scale"),
        ("l1_norm", {"training_steps": 3}, "training_steps"),
        ("taylor", {"warmup_step": 3}, "warmup_step"),
    ],
)
def test_bad_method_parameters_are_config_errors(method, params, key):
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ConfigError) as info:
        compress_core.create(method, model, [{"op_types": ["Linear"], "sparse_ratio": 0.5}], **params)
    assert info.value.key == key
    assert get_wrapper(model[0]) is None


# -- training-aware methods ---------------------------------------------------------------------


def test_slim_factors_regulariser_and_masks():
    layer = linear_with([[1.0, 2.0, 3.0]] * 4)
    weight = layer.weight
    model = nn.Sequential(layer)
    comp = compress_core.create("slim", model, [{"op_types": ["Linear"], "sparse_ratio": 0.5}], regular_scale=0.5)
    assert model[0].weight is weight  # the user's parameter keeps its identity
    (factor,) = list(comp.parameters())
    assert factor.shape == (4, 1) and torch.equal(factor.detach(), torch.ones(4, 1))
    assert comp.loss().item() == pytest.approx(0.5 * 4)
    with torch.no_grad():
        factor.copy_(torch.tensor([[0.1], [2.0], [-3.0], [0.5]]))
    comp.loss().backward()
    # d/df of 0.5 * sum|f| is 0.5 * sign(f).
    assert torch.equal(factor.grad, 0.5 * torch.tensor([[1.0], [1.0], [-1.0], [1.0]]))
    masks = comp.compress()
    keep = torch.tensor([False, True, True, False])  # |f|: 0.1, 2, 3, 0.5
    assert torch.equal(masks["0"]["bias"], keep)
    x = torch.tensor([[1.0, 1.0, 1.0]])
    expected = torch.where(keep, torch.tensor([0.6, 12.0, -18.0, 3.0]) + 1.0, 0.0)
    torch.testing.assert_close(model(x), expected[None])
    compress_core.unwrap(model, bake=True)
    torch.testing.assert_close(model(x), expected[None])


TAYLOR_WEIGHT = [[4.0, 4.0, 4.0], [1.0, 1.0, 1.0], [2.0, 0.0, 0.0], [0.1, 0.1, 0.1]]
COEFF = torch.tensor([1.0, 2.0, 3.0, 4.0])


def taylor_run(threshold: float) -> tuple[nn.Sequential, compress_core.Compressor]:
    model = nn.Sequential(linear_with(TAYLOR_WEIGHT, bias=False))
    config = [{"op_types": ["Linear"], "sparse_threshold": threshold}]
    comp = compress_core.create("taylor", model, config, training_steps=2)
    for scale in (1.0, 2.0):
        # dL/dW[i, j] = COEFF[i] * sum_n x[n, j] = COEFF[i] * scale.
        x = torch.full((1, 3), scale)
        (model(x) * COEFF).sum().backward()
        comp.step()
    return model, comp


def test_taylor_importance_is_the_mean_over_training_steps():
    model, comp = taylor_run(100.0)
    # Row sums of (w * g)^2 for scale 1: 48, 12, 36, 0.48; scale 2 is 4x that. Their mean
    # (2.5x) is 120, 30, 90, 1.2: below 100 are rows 1, 2, 3. (The sum would keep row 2, the
    # first step alone would prune row 0, the last alone would keep row 2.)
    keep = torch.tensor([True, False, False, False])
    # The masks are in force as soon as training_steps steps have run.
    assert torch.equal(model[0].weight__pruning_mask.expand(4, 3), rows(keep.tolist(), 3))
    # Collection has stopped: later gradients do not move the masks.
    (model(torch.full((1, 3), 100.0)) * COEFF.flip(0)).sum().backward()
    comp.step()
    assert torch.equal(comp.compress()["0"]["weight"], rows(keep.tolist(), 3))


def test_taylor_needs_gradients_before_compress():
    model = nn.Sequential(nn.Linear(2, 2))
    comp = compress_core.create("taylor", model, [{"op_types": ["Linear"], "sparse_ratio": 0.5}])
    with pytest.raises(ConfigError, match="no gradient"):
        comp.compress()


def test_taylor_on_outputs_accumulates_per_channel():
    model = nn.Sequential(nn.Linear(2, 3, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    config = [{"op_names": ["0"], "target_names": ["_output_"], "sparse_ratio": 0.34}]
    comp = compress_core.create("taylor", model, config, training_steps=1)
    x = torch.tensor([[3.0, 1.0], [1.0, 1.0]])  # outputs rows [3, 1, 4] and [1, 1, 2]
    (model(x) * torch.tensor([1.0, 5.0, 1.0])).sum().backward()
    comp.step()
    # (y * dL/dy)^2 summed over rows: ch0 9 + 1 = 10, ch1 25 + 25 = 50, ch2 16 + 4 = 20.
    assert torch.equal(comp.compress()["0"]["_output_"], torch.tensor([False, True, True]))


def test_movement_scores_learn_w_times_grad_and_follow_the_cubic_schedule():
    layer = linear_with([[float(i + 1), 0.0] for i in range(8)], bias=False)
    model = nn.Sequential(layer)
    config = [{"op_types": ["Linear"], "sparse_ratio": 0.75}]
    comp = compress_core.create("movement", model, config, warmup_step=1, cooldown_begin_step=4)
    (scores,) = list(comp.parameters())
    optimizer = torch.optim.SGD([scores], lr=1.0)
    coeff = torch.tensor([-1.0, 1.0, -2.0, 2.0, -3.0, 3.0, -4.0, 4.0])
    x = torch.tensor([[1.0, 5.0]])
    out = model(x)
    torch.testing.assert_close(out, (x @ layer.weight.T).detach())  # nothing masked yet
    (out * coeff).sum().backward()
    optimizer.step()
    # dL/ds_i = sum_j w_ij * dL/dw_ij = (i + 1) * coeff_i * x_0; SGD with lr 1 subtracts it.
    expected = -torch.tensor([float(i + 1) for i in range(8)]) * coeff
    torch.testing.assert_close(scores.detach()[:, 0], expected)
    # Scores: -1*-1=1, -4, 6, -8, 15, -18, 28, -32 (ascending: rows 7, 5, 3, 1, 0, 2, 4, 6).
    order = [7, 5, 3, 1, 0, 2, 4, 6]
    # Pruned rows after each step: none at warm-up, then floor(8 * 0.75 * (1 - (1 - t/3)^3)).
    for step, count in zip(range(1, 6), (0, 4, 5, 6, 6)):
        comp.step()
        keep = torch.ones(8, dtype=torch.bool)
        keep[order[:count]] = False
        assert torch.equal(layer.weight__pruning_mask[:, 0], keep), step
    masked = model(x)
    torch.testing.assert_close(masked, x @ (layer.weight * keep[:, None]).T)
    assert torch.equal(comp.compress()["0"]["weight"][:, 0], keep)


def test_movement_threshold_range_is_the_score():
    layer = linear_with([[1.0], [1.0], [1.0]], bias=False)
    model = nn.Sequential(layer)
    comp = compress_core.create("movement", model, [{"op_types": ["Linear"], "sparse_threshold": 0.0}],
                                warmup_step=0, cooldown_begin_step=1)
    (scores,) = list(comp.parameters())
    with torch.no_grad():
        scores.copy_(torch.tensor([[-0.5], [0.0], [0.5]]))
    assert torch.equal(comp.compress()["0"]["weight"][:, 0], torch.tensor([False, True, True]))


def test_training_aware_parameters_follow_state_dict_and_keep_user_identity():
    model = nn.Sequential(nn.Linear(3, 4))
    before = {name: p for name, p in model.named_parameters()}
    comp = compress_core.create("movement", model, [{"op_types": ["Linear"], "sparse_ratio": 0.5}])
    for name, p in before.items():
        assert dict(model.named_parameters())[name] is p
    (scores,) = list(comp.parameters())
    assert any(v is scores for v in model.parameters())
    assert "0.weight__pruning_movement_score" in model.state_dict()
    compress_core.unwrap(model)
    assert set(dict(model.named_parameters())) == set(before)


def test_every_method_and_alias_is_registered():
    names = {m["name"]: m for m in compress_core.list_methods()}
    expected = {
        "level": "LevelPruner", "l1_norm": "L1NormPruner", "l2_norm": "L2NormPruner", "fpgm": "FPGMPruner",
        "slim": "SlimPruner", "taylor": "TaylorPruner", "movement": "MovementPruner",
        "linear": "LinearPruner", "agp": "AGPPruner",
    }
    for name, alias in expected.items():
        assert names[name]["kind"] == "pruning" and alias in names[name]["aliases"]
    assert compress_core.get_host().method("TaylorFOWeightPruner").name == "taylor"


def test_docs_pruning_examples_run():
    doc = Path(__file__).resolve().parents[1] / "docs" / "pruning.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 3  # other sections (dependency detection) add their own
    for block in blocks:
        exec(compile(block, str(doc), "exec"), {"__name__": "pruning_md"})


def test_grouped_conv_and_dense_conv_share_channel_groups_with_internal_metric_block():
    grouped = nn.Conv2d(4, 4, 1, groups=2)
    dense = nn.Conv2d(4, 4, 1)
    with torch.no_grad():
        grouped.weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 0.0], [5.0, 0.0], [5.0, 0.0]]).view(4, 2, 1, 1))
        dense.weight.zero_()
        dense.weight[:, 0, 0, 0] = torch.tensor([6.0, 0.0, 0.0, 2.0])
    model = nn.ModuleDict({"grouped": grouped, "dense": dense})
    group = {"op_types": ["Conv2d"], "sparse_ratio": 0.5, "dependency_group_id": "sum"}
    # Mean channel sums 3.5, 0.5, 2.5, 3.5: alone, channels 1 and 2 would go ...
    masks = compress_core.create("l1_norm", model, [group]).compress()
    assert torch.equal(masks["grouped"]["bias"], torch.tensor([True, False, False, True]))
    # ... but whole groups of 2 channels (means 2.0 and 3.0) drop the first group.
    model = nn.ModuleDict({"grouped": grouped, "dense": dense})
    compress_core.unwrap(model)
    masks = compress_core.create("l1_norm", model, [{**group, "internal_metric_block": 2}]).compress()
    keep = torch.tensor([False, False, True, True])
    for name in ("grouped", "dense"):
        assert torch.equal(masks[name]["bias"], keep)
        assert torch.equal(masks[name]["weight"][:, 0, 0, 0], keep)


@pytest.mark.parametrize("method", ["slim", "movement"])
def test_trainable_per_channel_tensors_on_outputs(method):
    model = nn.Sequential(nn.Linear(2, 3, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    config = [{"op_names": ["0"], "target_names": ["_output_"], "sparse_ratio": 0.34}]
    params = {"warmup_step": 0, "cooldown_begin_step": 1} if method == "movement" else {}
    comp = compress_core.create(method, model, config, **params)
    (tensor,) = list(comp.parameters())
    assert tensor.shape == (3,)
    with torch.no_grad():
        tensor.copy_(torch.tensor([2.0, 0.1, 1.0]))
    masks = comp.compress()
    keep = torch.tensor([True, False, True])
    assert torch.equal(masks["0"]["_output_"], keep)
    x = torch.tensor([[3.0, 1.0]])  # unmasked output [3, 1, 4]
    scale = torch.tensor([2.0, 0.1, 1.0]) if method == "slim" else torch.ones(3)
    torch.testing.assert_close(model(x), (torch.tensor([3.0, 1.0, 4.0]) * scale * keep)[None])


def test_trainable_per_channel_tensors_need_a_known_channel_count():
    model = nn.Sequential(nn.ReLU())
    config = [{"op_names": ["0"], "target_names": ["_output_"], "sparse_ratio": 0.5}]
    with pytest.raises(ConfigError, match="channel count") as info:
        compress_core.create("slim", model, config)
    assert info.value.module == "0"
    assert get_wrapper(model[0]) is None
