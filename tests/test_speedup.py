"""Speedup: smaller layers, outputs equal to the masked model, clear failures, save/load.

References are built independently of speedup's propagation: either hand-sliced layers in
float64, or the masked model baked with masks the test writes out in full (including the
BatchNorm channels behind a pruned conv), or hand-computed constants.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compress_core
from compress_core import (
    PluginHost,
    SpeedupError,
    SpeedupWarning,
    hookimpl,
    load_pruned,
    save_pruned,
    speedup,
)
from compress_core.speedup import shrink_tensors


def rows(keep: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """A mask over ``shape`` keeping whole rows (dim 0) where ``keep`` is 1."""
    k = torch.tensor(keep, dtype=torch.bool)
    return k.view(-1, *([1] * (len(shape) - 1))).expand(shape).clone()


def baked(model: nn.Module, masks: dict) -> nn.Module:
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, targets in masks.items():
            module = ref.get_submodule(name)
            for target, mask in targets.items():
                getattr(module, target).mul_(mask.to(torch.float32))
    return ref


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


def empty_host() -> PluginHost:
    return PluginHost()  # no plugins: only speedup's built-in replacers


# -- MLP ------------------------------------------------------------------------------------


def test_mlp_matches_hand_sliced_float64_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    keep0, keep2 = [1, 0, 1, 1, 0], [0, 1, 1, 0]
    masks = {
        "0": {"weight": rows(keep0, (5, 6)), "bias": torch.tensor(keep0, dtype=torch.bool)},
        "2": {"weight": rows(keep2, (4, 5)), "bias": torch.tensor(keep2, dtype=torch.bool)},
    }
    x = torch.randn(7, 6)
    small = speedup(model, masks, (x,), host=empty_host())
    assert (small[0].in_features, small[0].out_features) == (6, 3)
    assert (small[2].in_features, small[2].out_features) == (3, 2)
    assert small[4].in_features == 2
    # Independent reference: the kept rows/columns, by hand, in float64.
    i0, i2 = [0, 2, 3], [1, 2]
    w0, b0 = model[0].weight.double()[i0], model[0].bias.double()[i0]
    w2, b2 = model[2].weight.double()[i2][:, i0], model[2].bias.double()[i2]
    w4, b4 = model[4].weight.double()[:, i2], model[4].bias.double()
    expected = torch.tanh(torch.relu(x.double() @ w0.T + b0) @ w2.T + b2) @ w4.T + b4
    assert rel_err(small(x), expected) < 1e-6
    # the user's model is untouched
    assert model[0].weight.shape == (5, 6) and small is not model


# -- CNN: BatchNorm behind a pruned conv, residual add, constant folding --------------------


class ResCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 16, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.b1(self.c1(x)))
        y = y + torch.relu(self.b2(self.c2(y)))
        y = torch.sigmoid(self.c3(y))
        return self.fc(torch.flatten(self.pool(y), 1))


def _randomize_bn(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-1, 1)


@pytest.mark.parametrize("capture", ["export", "eager"])
def test_cnn_with_batchnorm_residual_and_sigmoid_constant(capture):
    torch.manual_seed(1)
    model = ResCNN().eval()
    _randomize_bn(model)
    keep = [1, 0, 1, 1, 0, 1, 0, 1]  # shared by the residual pair c1/c2 (one dependency group)
    keep3 = [1, 0] * 8
    kb = torch.tensor(keep, dtype=torch.bool)
    masks = {
        "c1": {"weight": rows(keep, (8, 3, 3, 3)), "bias": kb},
        "c2": {"weight": rows(keep, (8, 8, 3, 3)), "bias": kb},
        "c3": {"weight": rows(keep3, (16, 8, 1, 1)), "bias": torch.tensor(keep3, dtype=torch.bool)},
    }
    x = torch.randn(4, 3, 10, 10)
    small, report = speedup(
        model, masks, (x,), return_report=True, host=empty_host(), capture_method=capture
    )
    assert small.c1.out_channels == 5 and small.b1.num_features == 5
    assert small.c2.weight.shape == (5, 5, 3, 3) and small.b2.running_var.shape == (5,)
    assert small.c3.weight.shape == (8, 5, 1, 1) and small.fc.weight.shape == (5, 8)
    # Reference: the masked model where the BatchNorms lose the pruned channels too.
    full = dict(masks, b1={"weight": kb, "bias": kb}, b2={"weight": kb, "bias": kb})
    reference = baked(model, full)(x)
    assert rel_err(small(x), reference) < 1e-5
    # sigmoid(0) = 0.5 reaches fc through the pool from the 8 removed c3 channels; by hand:
    removed = torch.tensor(keep3) == 0
    expected_bias = model.fc.bias + 0.5 * model.fc.weight[:, removed].sum(1)
    assert torch.allclose(small.fc.bias, expected_bias, atol=1e-6)
    assert report.folded == ["fc"] and report.inexact == []
    # NNI's failure mode: without removing the BatchNorm channels the masked model differs.
    assert rel_err(baked(model, masks)(x), reference) > 1e-3


class ConstNet(nn.Module):
    """conv -> BatchNorm without affine: a pruned channel leaves -mean/sqrt(var+eps)."""

    def __init__(self, padded: bool, bias: bool = True) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4, affine=False)
        self.c2 = nn.Conv2d(4, 3, 3, padding=1 if padded else 0, bias=bias)
        self.fc = nn.Linear(3, 2, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.c2(self.bn(self.c1(x))))
        return self.fc(y.mean((2, 3)))


def test_constant_folded_exactly_into_an_unpadded_conv_without_bias():
    torch.manual_seed(2)
    model = ConstNet(padded=False, bias=False).eval()
    _randomize_bn(model)
    masks = {"c1": {"weight": rows([1, 0, 0, 1], (4, 2, 3, 3))}}
    x = torch.randn(3, 2, 8, 8)
    small, report = speedup(model, masks, (x,), return_report=True, host=empty_host())
    assert small.c1.out_channels == 2 and small.bn.num_features == 2 and small.c2.in_channels == 2
    const = -model.bn.running_mean / torch.sqrt(model.bn.running_var + model.bn.eps)
    expected = (model.c2.weight[:, [1, 2]].sum((2, 3)) * const[[1, 2]]).sum(1)
    assert torch.allclose(small.c2.bias, expected, atol=1e-6)  # a bias was added for it
    assert rel_err(small(x), baked(model, masks)(x)) < 1e-5
    assert report.folded == ["c2"] and report.inexact == []


def test_constant_into_a_padded_conv_is_reported():
    torch.manual_seed(3)
    model = ConstNet(padded=True).eval()
    _randomize_bn(model)
    masks = {"c1": {"weight": rows([1, 0, 0, 1], (4, 2, 3, 3))}}
    x = torch.randn(3, 2, 8, 8)
    with pytest.warns(SpeedupWarning, match="'c2'"):
        small, report = speedup(model, masks, (x,), return_report=True, host=empty_host())
    assert len(report.inexact) == 1 and "padded conv" in report.inexact[0]
    assert small.c2.in_channels == 2


# -- layer zoo: masks written out in full, so the reference is just the baked model -----------


def _zoo() -> list[tuple[str, nn.Module, torch.Tensor, dict, dict]]:
    k4 = [1, 0, 1, 1]
    b4 = torch.tensor(k4, dtype=torch.bool)
    cases = []

    class Depthwise(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pw = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)
            self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
            self.act = nn.PReLU(4)
            self.out = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.out(self.act(self.dw(self.bn(self.pw(x)))))

    m = Depthwise()
    masks = {
        "pw": {"weight": rows(k4, (4, 3, 1, 1)), "bias": b4},
        "bn": {"weight": b4, "bias": b4},
        "dw": {"weight": rows(k4, (4, 1, 3, 3)), "bias": b4},
        "act": {"weight": b4},
    }
    cases.append(
        (
            "depthwise",
            m,
            torch.randn(2, 3, 6, 6),
            masks,
            {
                "pw.weight": (3, 3, 1, 1),
                "dw.weight": (3, 1, 3, 3),
                "act.weight": (3,),
                "out.weight": (2, 3, 1, 1),
            },
        )
    )
    # A grouped (not depthwise) conv that keeps all its outputs keeps every group, so its inputs
    # stay and the conv before it keeps its channels too.
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1, groups=2))
    cases.append(
        (
            "grouped",
            m,
            torch.randn(2, 3, 5, 5),
            {"0": {"weight": rows(k4, (4, 3, 1, 1)), "bias": b4}},
            {"0.weight": (4, 3, 1, 1), "1.weight": (4, 2, 1, 1)},
        )
    )

    class Transposed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = nn.ConvTranspose2d(3, 4, 2, stride=2)
            self.conv = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.conv(self.up(x))

    m = Transposed()
    tmask = b4.view(1, 4, 1, 1).expand(3, 4, 2, 2).clone()  # output channels are weight dim 1
    cases.append(
        (
            "conv_transpose",
            m,
            torch.randn(2, 3, 4, 4),
            {"up": {"weight": tmask, "bias": b4}},
            {"up.weight": (3, 3, 2, 2), "up.bias": (3,), "conv.weight": (2, 3, 1, 1)},
        )
    )

    class Seq1d(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.conv = nn.Conv1d(4, 4, 3)
            self.bn = nn.BatchNorm1d(4)
            self.ln = nn.LayerNorm(4)
            self.fc = nn.Linear(4, 2)

        def forward(self, ids):
            h = self.emb(ids).transpose(1, 2)  # [B, C, T]
            h = F.relu(self.bn(self.conv(h)))
            return self.fc(self.ln(h.permute(0, 2, 1)))  # LayerNorm keeps its channels

    m = Seq1d()
    cases.append(
        (
            "conv1d_embedding",
            m,
            torch.randint(0, 10, (2, 7)),
            {"conv": {"weight": rows(k4, (4, 4, 3)), "bias": b4}, "bn": {"weight": b4, "bias": b4}},
            {"conv.weight": (4, 4, 3), "ln.weight": (4,)},
        )
    )
    emb_mask = b4.view(1, 4).expand(10, 4).clone()  # embedding dims (columns) 1 and ... pruned
    m2 = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3))
    cases.append(
        (
            "embedding_columns",
            m2,
            torch.randint(0, 10, (2, 5)),
            {"0": {"weight": emb_mask}},
            {"0.weight": (10, 3), "1.weight": (3, 3)},
        )
    )
    return cases


@pytest.mark.parametrize("capture", ["export", "eager"])
@pytest.mark.parametrize("case", _zoo(), ids=lambda c: c[0])
def test_layer_zoo_equals_the_baked_model(case, capture):
    torch.manual_seed(4)
    _, model, x, masks, shapes = case
    model.eval()
    _randomize_bn(model)
    small = speedup(model, masks, (x,), host=empty_host(), capture_method=capture)
    state = small.state_dict()
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert rel_err(small(x), baked(model, masks)(x)) < 1e-5


@pytest.mark.parametrize("capture", ["export", "eager"])
def test_attention_heads_removed_through_view_and_transpose(capture):
    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))

        def forward(self, x):
            b, n, _ = x.shape
            q, k, v = (p(x).view(b, n, -1, 2).transpose(1, 2) for p in (self.q, self.k, self.v))
            a = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
            return self.o(a.transpose(1, 2).reshape(b, n, -1))

    torch.manual_seed(5)
    model = Attn().eval()
    heads = torch.tensor([1, 0, 0, 1], dtype=torch.bool).repeat_interleave(2)  # heads 0 and 3
    masks = {
        n: {"weight": rows(heads.int().tolist(), (8, 8)), "bias": heads} for n in ("q", "k", "v")
    }
    x = torch.randn(2, 5, 8)
    small = speedup(model, masks, (x,), host=empty_host(), capture_method=capture)
    assert [
        small.q.out_features,
        small.k.out_features,
        small.v.out_features,
        small.o.in_features,
    ] == [4, 4, 4, 4]
    assert rel_err(small(x), baked(model, masks)(x)) < 1e-5


# -- failures: clear errors, nothing of the user's model changed --------------------------------


class Scale(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 2.0, channels))

    def forward(self, x):
        return x * self.scale.view(1, -1, 1, 1)


class ScaleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 1)
        self.scale = Scale(4)
        self.head = nn.Conv2d(4, 1, 1)

    def forward(self, x):
        return self.head(self.scale(self.conv(x)))


def _scale_masks():
    b = torch.tensor([1, 0, 1, 0], dtype=torch.bool)
    return {"conv": {"weight": rows([1, 0, 1, 0], (4, 2, 1, 1)), "bias": b}}


def test_unknown_module_type_raises_naming_module_and_hook_and_leaves_model_alone():
    model = ScaleNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        SpeedupError, match=r"module 'scale' \(.*Scale\).*compress_register_replacers"
    ) as info:
        speedup(model, _scale_masks(), (torch.randn(1, 2, 3, 3),), host=empty_host())
    assert info.value.module == "scale"
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_compress_register_replacers_teaches_a_custom_type():
    calls = []

    class ScalePlugin:
        @hookimpl
        def compress_register_replacers(self, registry):
            def replace(module, keep):
                calls.append({k: {d: m.tolist() for d, m in v.items()} for k, v in keep.items()})
                return shrink_tensors(module, keep)

            registry.add_module_replacer(Scale, replace)

    host = PluginHost()
    info = host.register(ScalePlugin(), "scale_plugin")
    assert info.status == "ok" and info.hooks == ["compress_register_replacers"]
    model = ScaleNet()
    x = torch.randn(2, 2, 3, 3)
    small = speedup(model, _scale_masks(), (x,), host=host)
    assert calls == [{"scale": {0: [True, False, True, False]}}]
    assert small.scale.scale.tolist() == pytest.approx([0.5, 1.5])
    assert rel_err(small(x), baked(model, _scale_masks())(x)) < 1e-6


def test_two_plugins_claiming_one_type_is_an_error_naming_both():
    class P:
        @hookimpl
        def compress_register_replacers(self, registry):
            registry.add_module_replacer(Scale, shrink_tensors)

    host = PluginHost()
    assert host.register(P(), "first").status == "ok"
    with pytest.warns(compress_core.PluginWarning):
        second = host.register(P(), "second")
    assert second.status == "error" and "'first'" in second.error and "Scale" in second.error


class CumsumNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 1)
        self.head = nn.Conv2d(4, 1, 1)

    def forward(self, x):
        return self.head(torch.cumsum(self.conv(x), dim=1))


def test_unsupported_op_on_pruned_channels_raises_naming_the_node():
    model = CumsumNet()
    with pytest.raises(
        SpeedupError, match=r"graph node 'cumsum' \(op 'cumsum'.*strict=False"
    ) as info:
        speedup(model, _scale_masks(), (torch.randn(1, 2, 3, 3),), host=empty_host())
    assert info.value.node == "cumsum"
    assert model.conv.out_channels == 4


def test_unsupported_op_with_strict_false_keeps_those_channels():
    model = CumsumNet()
    x = torch.randn(2, 2, 3, 3)
    small, report = speedup(
        model, _scale_masks(), (x,), strict=False, return_report=True, host=empty_host()
    )
    assert small.conv.out_channels == 4 and report.blocked and "cumsum" in report.blocked[0]
    assert rel_err(small(x), baked(model, _scale_masks())(x)) < 1e-6


@pytest.mark.parametrize(
    "masks, match",
    [
        ({"nope": {"weight": torch.ones(4, 2, 1, 1)}}, "module 'nope'"),
        ({"conv": {"weight": torch.ones(3)}}, r"shape \(3,\)"),
        ({"conv": {"_output_": torch.ones(4)}}, "parameter and buffer masks only"),
    ],
)
def test_bad_masks_are_rejected(masks, match):
    with pytest.raises(SpeedupError, match=match):
        speedup(ScaleNet(), masks, (torch.randn(1, 2, 3, 3),), host=empty_host())


def test_example_inputs_must_be_a_tuple():
    with pytest.raises(SpeedupError, match="tuple"):
        speedup(ScaleNet(), {}, torch.randn(1, 2, 3, 3), host=empty_host())


def test_wrapped_model_from_a_pruner_is_left_wrapped_and_unchanged():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    comp = compress_core.create("l1_norm", model, [{"op_names": ["0"], "sparse_ratio": 0.5}])
    masks = comp.compress()
    x = torch.randn(3, 6)
    masked_out = model(x)  # wrapped: simulates the masks
    small = speedup(model, masks, (x,))
    assert small[0].out_features == 4 and small[2].in_features == 4
    assert rel_err(small(x), masked_out) < 1e-5
    assert model[0].weight.shape == (8, 6)
    assert list(compress_core.wrapper.wrappers(model))  # still wrapped
    assert list(compress_core.wrapper.wrappers(small)) == []


# -- save / load_pruned -----------------------------------------------------------------------


def test_save_and_load_pruned_rebuilds_from_the_original_class(tmp_path):
    torch.manual_seed(7)
    model = ConstNet(padded=False, bias=False).eval()
    _randomize_bn(model)
    masks = {"c1": {"weight": rows([0, 1, 1, 0], (4, 2, 3, 3))}}
    x = torch.randn(2, 2, 8, 8)
    small = speedup(model, masks, (x,), host=empty_host())
    folder = save_pruned(small, tmp_path / "pruned")
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "pruned.json"]
    fresh = ConstNet(padded=False, bias=False).eval()
    loaded = load_pruned(fresh, folder, host=empty_host())
    assert loaded is fresh and fresh.c2.bias is not None  # the folded constant's bias
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {
        k: v.shape for k, v in small.state_dict().items()
    }
    assert torch.equal(fresh(x), small(x))


def test_load_pruned_into_the_wrong_model_fails_before_changing_it(tmp_path):
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    masks = {"0": {"weight": rows([0] * 4 + [1] * 4, (8, 6))}}
    save_pruned(speedup(model, masks, (torch.randn(1, 6),), host=empty_host()), tmp_path)
    wrong = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(SpeedupError, match="is this the model class"):
        load_pruned(wrong, tmp_path, host=empty_host())
    assert wrong[0].weight.shape == (4, 6)
    with pytest.raises(SpeedupError, match="not a saved pruned model"):
        load_pruned(wrong, tmp_path / "missing", host=empty_host())
    with pytest.raises(SpeedupError, match=r"returned by compress_core\.speedup"):
        save_pruned(wrong, tmp_path / "x")


def test_a_plugin_replacer_updates_a_stored_head_count():
    from examples.models.llama_block import LlamaAttention, LlamaBlock

    torch.manual_seed(8)
    model = LlamaBlock(hidden=32, num_heads=4, intermediate=48).eval()
    heads = torch.tensor([1, 0, 1, 1], dtype=torch.bool).repeat_interleave(8)
    names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    masks = {n: {"weight": rows(heads.int().tolist(), (32, 32))} for n in names}
    x = torch.randn(2, 6, 32)
    # LlamaAttention passes self.num_heads to view(): without a replacer the forward fails.
    with pytest.raises(SpeedupError, match=r"forward failed.*compress_register_replacers"):
        speedup(model, masks, (x,), host=empty_host())

    class HeadsPlugin:
        @hookimpl
        def compress_register_replacers(self, registry):
            def replace(module, keep):
                assert keep == {}  # called because its q/k/v/o projections shrank
                module.num_heads = module.q_proj.out_features // module.head_dim
                return module

            registry.add_module_replacer(LlamaAttention, replace)

    host = PluginHost()
    host.register(HeadsPlugin(), "heads")
    small = speedup(model, masks, (x,), host=host)
    assert small.self_attn.num_heads == 3 and small.self_attn.o_proj.in_features == 24
    assert rel_err(small(x), baked(model, masks)(x)) < 1e-5


@pytest.mark.parametrize("capture", ["export", "eager"])
def test_flatten_into_linear_keeps_the_spatial_positions_of_kept_channels(capture):
    # conv -> flatten(1) -> Linear: the Linear's inputs are channel-major blocks of H*W columns.
    # Pruning channels must remove exactly those blocks, not the spatial positions too.
    torch.manual_seed(0)

    class ConvFlattenLinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1, stride=2)
            self.fc = nn.Linear(4 * 2 * 2, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.conv(x)).flatten(1))

    model = ConvFlattenLinear().eval()
    keep = torch.tensor([True, False, True, False])
    masks = {"conv": {"weight": keep[:, None, None, None].expand(4, 1, 3, 3), "bias": keep}}
    x = torch.randn(5, 1, 4, 4)
    small = compress_core.speedup(model, masks, (x,), capture_method=capture)
    assert small.conv.out_channels == 2
    columns = keep.repeat_interleave(4)  # channel c owns columns 4c..4c+3 after flatten
    assert small.fc.in_features == 8
    torch.testing.assert_close(small.fc.weight, model.fc.weight[:, columns])
    masked = F.linear(
        torch.relu(F.conv2d(x, model.conv.weight * keep[:, None, None, None], model.conv.bias * keep, stride=2, padding=1)).flatten(1),
        model.fc.weight,
        model.fc.bias,
    )
    torch.testing.assert_close(small(x), masked, rtol=1e-5, atol=1e-6)


class TanhshrinkHead(nn.Module):
    """``tanhshrink`` has no eager rule; export decomposes it into ``tanh`` and ``sub``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.tanhshrink(self.a(x)))


def tanhshrink_case() -> tuple[nn.Module, dict, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = TanhshrinkHead()
    keep = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    masks = {"a": {"weight": keep[:, None].expand(6, 4).clone(), "bias": keep.clone()}}
    return model, masks, torch.randn(3, 4), keep


def test_auto_capture_falls_back_to_export_when_removed_channels_reach_an_eager_op_without_rule():
    model, masks, x, keep = tanhshrink_case()
    with pytest.raises(SpeedupError, match="'tanhshrink'"):
        speedup(model, masks, (x,), host=empty_host(), capture_method="eager")
    small, report = speedup(model, masks, (x,), host=empty_host(), return_report=True)
    assert report.capture_method == "export" and report.blocked == []
    assert torch.equal(small.a.weight, model.a.weight[keep]) and torch.equal(small.a.bias, model.a.bias[keep])
    assert torch.equal(small.head.weight, model.head.weight[:, keep])
    masked = model.head(F.tanhshrink((x @ model.a.weight.T + model.a.bias) * keep))
    torch.testing.assert_close(small(x), masked, rtol=0, atol=1e-5)
    exported = speedup(model, masks, (x,), host=empty_host(), capture_method="export")
    assert all(torch.equal(p, q) for p, q in zip(small.state_dict().values(), exported.state_dict().values()))


class TanhHead(TanhshrinkHead):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.a(x)))


def test_auto_capture_stays_eager_when_eager_follows_every_pruned_channel():
    _, masks, x, keep = tanhshrink_case()
    model = TanhHead()
    small, report = speedup(model, masks, (x,), host=empty_host(), return_report=True)
    assert report.capture_method == "eager"
    assert torch.equal(small.head.weight, model.head.weight[:, keep])


class GroupedConvNet(nn.Module):
    """conv1 (8 channels) feeds a conv with 4 groups: 2 input and 3 output channels each."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 1)
        self.conv_g = nn.Conv2d(8, 12, 3, padding=1, groups=4)
        self.head = nn.Conv2d(12, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv_g(torch.relu(self.conv1(x)))))


def grouped_masks(keep_in: list[int], keep_out: list[int]) -> dict[str, dict[str, torch.Tensor]]:
    kin, kout = torch.tensor(keep_in, dtype=torch.bool), torch.tensor(keep_out, dtype=torch.bool)
    return {
        "conv1": {"weight": kin[:, None, None, None].expand(8, 3, 1, 1).clone(), "bias": kin.clone()},
        "conv_g": {"weight": kout[:, None, None, None].expand(12, 2, 3, 3).clone(), "bias": kout.clone()},
    }


def masked_grouped_output(model: GroupedConvNet, masks: dict, x: torch.Tensor) -> torch.Tensor:
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, targets in masks.items():
            for target, mask in targets.items():
                getattr(getattr(ref, name), target).mul_(mask)
        return ref(x)


@pytest.mark.parametrize("capture", ["export", "eager"])
def test_grouped_conv_loses_whole_groups_removed_on_both_sides(capture):
    torch.manual_seed(0)
    model, x = GroupedConvNet(), torch.randn(2, 3, 6, 6)
    # groups 1 and 3 go: conv1 drops their input channels (2-3, 6-7), conv_g their outputs (3-5, 9-11)
    masks = grouped_masks([1, 1, 0, 0, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 1, 1, 1, 0, 0, 0])
    small, report = speedup(model, masks, (x,), host=empty_host(), return_report=True, capture_method=capture)
    assert report.kept_whole == []
    conv = small.conv_g
    assert (conv.groups, conv.in_channels, conv.out_channels) == (2, 4, 6)
    assert torch.equal(conv.weight, model.conv_g.weight[[0, 1, 2, 6, 7, 8]])
    assert torch.equal(conv.bias, model.conv_g.bias[[0, 1, 2, 6, 7, 8]])
    assert torch.equal(small.conv1.weight, model.conv1.weight[[0, 1, 4, 5]])
    assert torch.equal(small.head.weight, model.head.weight[:, [0, 1, 2, 6, 7, 8]])
    torch.testing.assert_close(small(x), masked_grouped_output(model, masks, x), rtol=0, atol=1e-5)


def test_grouped_conv_keeps_a_group_that_one_side_still_uses():
    torch.manual_seed(0)
    model, x = GroupedConvNet(), torch.randn(2, 3, 6, 6)
    # conv1 drops group 1's inputs and conv_g group 2's outputs: only group 3 is gone on both
    masks = grouped_masks([1, 1, 0, 0, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    small = speedup(model, masks, (x,), host=empty_host())
    assert (small.conv_g.groups, small.conv_g.in_channels, small.conv_g.out_channels) == (3, 6, 9)
    # the kept halves of groups 1 and 2 keep their masked (zero) weights
    expected_g, expected_1 = model.conv_g.weight[:9].clone(), model.conv1.weight[:6].clone()
    expected_g[6:9], expected_1[2:4] = 0, 0
    assert torch.equal(small.conv_g.weight, expected_g)
    assert torch.equal(small.conv1.weight, expected_1)
    torch.testing.assert_close(small(x), masked_grouped_output(model, masks, x), rtol=0, atol=1e-5)


def test_grouped_conv_with_part_of_a_group_removed_is_kept_whole_and_reported():
    torch.manual_seed(0)
    model, x = GroupedConvNet(), torch.randn(2, 3, 6, 6)
    masks = grouped_masks([1, 1, 0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1])
    small, report = speedup(model, masks, (x,), host=empty_host(), return_report=True)
    assert report.kept_whole == ["'conv_g' (groups=4): its mask removes part of a group; kept whole"]
    assert (small.conv_g.groups, small.conv_g.in_channels, small.conv_g.out_channels) == (4, 8, 12)
    assert small.conv1.out_channels == 8  # its removed channels reach the whole-kept conv
    torch.testing.assert_close(small(x), masked_grouped_output(model, masks, x), rtol=0, atol=1e-5)
