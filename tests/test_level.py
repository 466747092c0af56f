"""The ``level`` pruner end to end through ``create``: masks worked out by hand."""

from __future__ import annotations

import torch
import torch.nn as nn

import compress_core


def linear_with(weight: list[list[float]], bias: bool = True) -> nn.Linear:
    w = torch.tensor(weight)
    layer = nn.Linear(w.shape[1], w.shape[0], bias=bias)
    with torch.no_grad():
        layer.weight.copy_(w)
        if bias:
            layer.bias.fill_(1.0)
    return layer


def test_element_ratio_masks_the_smallest_magnitudes():
    model = nn.Sequential(linear_with([[0.1, -5.0, 0.3], [2.0, -0.2, 4.0]]))
    masks = compress_core.create("level", model, [{"op_types": ["Linear"], "sparse_ratio": 0.5}]).compress()
    # |w| sorted: 0.1, 0.2, 0.3 | 2, 4, 5 -> floor(6 * 0.5) = 3 smallest are masked.
    expected = torch.tensor([[False, True, False], [True, False, True]])
    assert torch.equal(masks["0"]["weight"], expected)
    # Every row keeps something, so the aligned bias is fully kept.
    assert torch.equal(masks["0"]["bias"], torch.tensor([True, True]))


def test_block_granularity_prunes_whole_blocks_by_mean_magnitude():
    weight = [
        [1.0, 1.0, 9.0, 9.0],
        [1.0, 1.0, 9.0, 9.0],
        [5.0, 5.0, 0.5, 0.5],
        [5.0, 5.0, 0.5, 0.5],
    ]
    model = nn.Sequential(linear_with(weight))
    config = [{"op_types": ["Linear"], "sparse_ratio": 0.5, "granularity": [2, 2]}]
    masks = compress_core.create("level", model, config).compress()
    # Block means: top-left 1, top-right 9, bottom-left 5, bottom-right 0.5 -> drop 0.5 and 1.
    keep = torch.tensor([[False, True], [True, False]])
    expected = keep.repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert torch.equal(masks["0"]["weight"], expected)


def test_out_channel_masks_rows_and_the_aligned_bias():
    model = nn.Sequential(linear_with([[1.0, 1.0], [0.1, 0.1], [3.0, -3.0], [0.2, 0.0]]))
    config = [{"op_types": ["Linear"], "sparse_ratio": 0.5, "granularity": "out_channel"}]
    masks = compress_core.create("level", model, config).compress()
    rows = torch.tensor([True, False, True, False])  # row means 1, 0.1, 3, 0.1 -> two smallest go
    assert torch.equal(masks["0"]["weight"], rows[:, None].expand(4, 2))
    assert torch.equal(masks["0"]["bias"], rows)
    x = torch.randn(3, 2)
    expected = x @ (model[0].weight * rows[:, None]).T + torch.where(rows, 1.0, 0.0)
    torch.testing.assert_close(model(x), expected)


def test_threshold_is_capped_by_max_sparse_ratio():
    model = nn.Sequential(linear_with([[0.1, 0.2, 0.3, 0.4, 5.0]], bias=False))
    config = [{"op_types": ["Linear"], "sparse_threshold": 1.0, "max_sparse_ratio": 0.6}]
    masks = compress_core.create("level", model, config).compress()
    # Four values are below 1.0, but at most floor(5 * 0.6) = 3 may be masked.
    assert torch.equal(masks["0"]["weight"], torch.tensor([[False, False, False, True, True]]))


def test_global_group_ranks_across_layers():
    model = nn.Sequential(
        linear_with([[0.1, 0.2], [0.3, 0.4]], bias=False),  # 4 small weights
        linear_with([[5.0, 6.0], [7.0, 0.05]], bias=False),
    )
    config = [
        {"op_names": ["0"], "sparse_ratio": 0.5, "global_group_id": "g"},
        {"op_names": ["1"], "sparse_ratio": 0.5, "global_group_id": "g"},
    ]
    masks = compress_core.create("level", model, config).compress()
    # 8 weights, floor(8 * 0.5) = 4 masked globally: 0.05, 0.1, 0.2, 0.3.
    assert torch.equal(masks["0"]["weight"], torch.tensor([[False, False], [False, True]]))
    assert torch.equal(masks["1"]["weight"], torch.tensor([[True, True], [True, False]]))


def test_global_group_respects_per_target_max():
    model = nn.Sequential(
        linear_with([[0.1, 0.2], [0.3, 0.4]], bias=False),
        linear_with([[5.0, 6.0], [7.0, 8.0]], bias=False),
    )
    config = [
        {"op_names": ["0"], "sparse_ratio": 0.5, "global_group_id": 1, "max_sparse_ratio": 0.5},
        {"op_names": ["1"], "sparse_ratio": 0.5, "global_group_id": 1},
    ]
    masks = compress_core.create("level", model, config).compress()
    # Layer 0 may lose at most 2 of 4; the other 2 of the group's budget of 4 come from layer 1.
    assert torch.equal(masks["0"]["weight"], torch.tensor([[False, False], [True, True]]))
    assert torch.equal(masks["1"]["weight"], torch.tensor([[False, False], [True, True]]))


def test_dependency_group_prunes_identical_rows_from_the_mean_metric():
    model = nn.Sequential(
        linear_with([[1.0, 1.0], [0.0, 0.0], [4.0, 4.0]], bias=False),
        linear_with([[0.0, 0.0], [3.0, 3.0], [1.0, 1.0]], bias=False),
    )
    config = [
        {"op_types": ["Linear"], "sparse_ratio": 0.34, "granularity": "out_channel", "dependency_group_id": "res"}
    ]
    masks = compress_core.create("level", model, config).compress()
    # Row means averaged over the two layers: 0.5, 1.5, 2.5 -> floor(3 * 0.34) = 1 row: row 0.
    rows = torch.tensor([False, True, True])
    for name in ("0", "1"):
        assert torch.equal(masks[name]["weight"], rows[:, None].expand(3, 2))


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([3.0, 0.1, 2.0, 0.2]).view(4, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def test_batchnorm_aligned_to_another_modules_weight_and_its_bias_to_a_1d_source():
    model = ConvBN()
    config = [
        {"op_names": ["conv"], "sparse_ratio": 0.5, "granularity": "out_channel"},
        {
            "op_names": ["bn"],
            "target_names": ["weight"],
            "target_settings": {
                "weight": {"align": {"module_name": "conv", "target_name": "weight", "dims": [0]}},
                "bias": {"align": {"target_name": "weight", "dims": [0]}},
            },
        },
    ]
    masks = compress_core.create("level", model, config).compress()
    channels = torch.tensor([True, False, True, False])
    assert torch.equal(masks["bn"]["weight"], channels)
    assert torch.equal(masks["bn"]["bias"], channels)
    model.eval()
    x = torch.randn(2, 1, 3, 3)
    out = model(x)
    # Pruned channels: conv output 0 (weight and bias masked) and BN scale/shift 0 -> exactly 0.
    assert torch.count_nonzero(out[:, ~channels]) == 0
    assert torch.count_nonzero(out[:, channels]) > 0


def test_add_masks_on_an_activation_after_observing_data():
    model = nn.Sequential(nn.Identity(), nn.Softmax(dim=-1))
    config = [{"op_names": ["1"], "target_names": ["_input_"], "sparse_ratio": 0.5, "apply_method": "add"}]
    comp = compress_core.create("level", model, config)
    model(torch.tensor([[1.0, -4.0, 0.5, 3.0], [-1.0, 2.0, 0.5, -3.0]]))  # mean |x|: 1, 3, .5, 3
    masks = comp.compress()
    keep = torch.tensor([False, True, False, True])
    assert torch.equal(masks["1"]["_input_0"], keep)
    x = torch.zeros(1, 4)
    expected = torch.softmax(torch.where(keep, 0.0, -1000.0), dim=-1)
    torch.testing.assert_close(model(x), expected[None] if expected.dim() == 1 else expected)
