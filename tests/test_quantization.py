"""The quantization plugin: every key of the spec with the numbers fixed in design.md.

Expected scales and zero points are worked out by hand from the design formulas; expected
outputs come from a float64 reference that quantizes explicitly with those numbers and then
runs ``torch.nn.functional``.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compress_core
from compress_core import ConfigError, unwrap
from compress_core.quantization import affine_qparams, quant_range, symmetric_qparams


def ref_fq(x: torch.Tensor, scale, zero_point, qmin: int, qmax: int) -> torch.Tensor:
    """float64 quantize-dequantize with explicit numbers (round half to even, like torch)."""
    x = x.detach().double()
    scale = torch.as_tensor(scale, dtype=torch.float64)
    zero_point = torch.as_tensor(zero_point, dtype=torch.float64)
    q = (torch.round(x / scale) + zero_point).clamp(qmin, qmax)
    return (q - zero_point) * scale


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP()


# -- ranges and formulas --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        ("int8", (-127, 127)),
        ("uint8", (0, 255)),
        ("int4", (-7, 7)),
        ("uint4", (0, 15)),
        ("int2", (-1, 1)),
        ("uint2", (0, 3)),
    ],
)
def test_quant_ranges_follow_design(dtype: str, expected: tuple[int, int]) -> None:
    assert quant_range(dtype) == expected


def test_symmetric_and_affine_formulas() -> None:
    scale, zp = symmetric_qparams(torch.tensor(-2.0), torch.tensor(1.27), -127, 127)
    assert zp.item() == 0 and scale.item() == pytest.approx(2.0 / 127)
    scale, zp = symmetric_qparams(torch.tensor(-1.0), torch.tensor(2.54), 0, 255)
    # uint8: zero point (255+0+1)//2 = 128; 127 steps on the shorter side.
    assert zp.item() == 128 and scale.item() == pytest.approx(2.54 / 127)
    scale, zp = affine_qparams(torch.tensor(-1.0), torch.tensor(3.0), 0, 255)
    assert scale.item() == pytest.approx(4.0 / 255)
    assert zp.item() == 0 - round(-1.0 / (4.0 / 255))  # = 64


# -- ptq --------------------------------------------------------------------------------------


def test_ptq_default_is_int8_symmetric_per_tensor_and_matches_reference() -> None:
    model = mlp()
    x = torch.randn(32, 6)
    comp = compress_core.create("ptq", model, [{"op_names": ["fc1"]}])
    float_out = model(x)  # calibration: the model still computes in float
    torch.testing.assert_close(float_out, unwrap(mlp(), bake=False)(x))
    result = comp.compress()
    params = result["fc1"]
    assert set(params) == {"_input_0", "weight", "_output_"}
    w = model.fc1.weight.detach()
    assert params["weight"]["scale"].item() == pytest.approx(w.abs().max().item() / 127)
    assert params["_input_0"]["scale"].item() == pytest.approx(x.abs().max().item() / 127)
    for target in params.values():
        assert (target["quant_dtype"], target["quant_scheme"], target["qmin"], target["qmax"]) == (
            "int8",
            "symmetric",
            -127,
            127,
        )
        assert int(target["zero_point"]) == 0
    y = F.linear(x.double(), w.double(), model.fc1.bias.double())
    y_ref = F.linear(
        ref_fq(x, params["_input_0"]["scale"], 0, -127, 127),
        ref_fq(w, params["weight"]["scale"], 0, -127, 127),
        model.fc1.bias.double(),
    )
    out_scale = params["_output_"]["scale"].item()
    assert out_scale == pytest.approx(y.abs().max().item() / 127)
    expected = ref_fq(y_ref, out_scale, 0, -127, 127)
    actual = model.fc1(x).double()
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_ptq_affine_uint8_and_running_min_max_over_batches() -> None:
    model = mlp()
    comp = compress_core.create(
        "ptq",
        model,
        [
            {
                "op_names": ["fc1"],
                "target_names": ["_input_"],
                "quant_dtype": "uint8",
                "quant_scheme": "affine",
            }
        ],
    )
    a = torch.full((2, 6), 0.5)
    a[0, 0] = -1.0
    b = torch.full((2, 6), 0.5)
    b[1, 3] = 3.0
    model(a)
    model(b)
    params = comp.compress()["fc1"]["_input_0"]
    # min -1 (first batch), max 3 (second batch): scale 4/255, zero point 0 - round(-1/scale) = 64.
    assert params["scale"].item() == pytest.approx(4.0 / 255)
    assert int(params["zero_point"]) == 64
    assert (params["qmin"], params["qmax"]) == (0, 255)


def test_per_channel_weight_and_per_channel_output() -> None:
    model = mlp()
    x = torch.randn(16, 6)
    config = [{"op_names": ["fc1"], "granularity": "per_channel"}]
    comp = compress_core.create("ptq", model, config)
    model(x)
    params = comp.compress()["fc1"]
    w = model.fc1.weight.detach()
    torch.testing.assert_close(params["weight"]["scale"], w.abs().amax(1) / 127)
    y = F.linear(x, w, model.fc1.bias).detach()
    # On an output, per_channel is the last dimension (the spec's "-1 dimension").
    torch.testing.assert_close(params["_output_"]["scale"], y.abs().amax(0) / 127)
    out = model.fc1(x).double()
    y_ref = F.linear(
        ref_fq(x, params["_input_0"]["scale"].reshape(1, -1), 0, -127, 127),
        ref_fq(w, params["weight"]["scale"].reshape(-1, 1), 0, -127, 127),
        model.fc1.bias.double(),
    )
    torch.testing.assert_close(
        out, ref_fq(y_ref, params["_output_"]["scale"], 0, -127, 127), atol=1e-5, rtol=0
    )


def test_block_granularity_one_scale_per_block() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 4))
    comp = compress_core.create(
        "ptq", model, [{"op_names": ["0"], "target_names": ["weight"], "granularity": [2, 2]}]
    )
    params = comp.compress()["0"]["weight"]
    w = model[0].weight.detach()
    expected = (
        torch.tensor(
            [
                [w[:2, :2].abs().max(), w[:2, 2:].abs().max()],
                [w[2:, :2].abs().max(), w[2:, 2:].abs().max()],
            ]
        )
        / 127
    )
    torch.testing.assert_close(params["scale"], expected)
    scale_full = expected.repeat_interleave(2, 0).repeat_interleave(2, 1)
    x = torch.eye(4)
    torch.testing.assert_close(
        model(x).double(),
        F.linear(x.double(), ref_fq(w, scale_full, 0, -127, 127), model[0].bias.double()),
        atol=1e-6,
        rtol=0,
    )


def test_block_that_does_not_divide_is_config_error_before_touching() -> None:
    model = mlp()
    with pytest.raises(ConfigError) as info:
        compress_core.create(
            "ptq", model, [{"op_names": ["fc1"], "target_names": ["weight"], "granularity": [2, 4]}]
        )
    assert info.value.module == "fc1" and "granularity" in info.value.key
    assert not hasattr(model.fc1, "_compress_wrapper")


@pytest.mark.parametrize(
    ("dtype", "qmin", "qmax"), [("int4", -7, 7), ("uint4", 0, 15), ("int2", -1, 1)]
)
def test_low_bit_values_stay_in_range(dtype: str, qmin: int, qmax: int) -> None:
    model = mlp()
    comp = compress_core.create(
        "ptq", model, [{"op_names": ["fc1"], "target_names": ["weight"], "quant_dtype": dtype}]
    )
    params = comp.compress()["fc1"]["weight"]
    assert (params["qmin"], params["qmax"]) == (qmin, qmax)
    zp = (qmax + qmin + 1) // 2
    assert int(params["zero_point"]) == zp
    w = model.fc1.weight.detach()
    assert params["scale"].item() == pytest.approx(w.abs().max().item() / min(qmax - zp, zp - qmin))
    quantized = model.fc1.__dict__["_compress_wrapper"]  # the wrapper is installed
    assert quantized is not None
    with torch.no_grad():
        q = torch.round(unwrap(model, bake=True).fc1.weight / params["scale"]) + zp
    assert q.min() >= qmin and q.max() <= qmax
    assert len(torch.unique(q)) <= qmax - qmin + 1


def test_single_level_dtypes_are_config_errors() -> None:
    with pytest.raises(ConfigError) as info:
        compress_core.create("ptq", mlp(), [{"op_names": ["fc1"], "quant_dtype": "int1"}])
    assert "single level" in str(info.value) and info.value.module == "fc1"
    with pytest.raises(ConfigError, match="use affine"):
        compress_core.create("ptq", mlp(), [{"op_names": ["fc1"], "quant_dtype": "uint1"}])


def test_overwrite_rule_later_entry_wins_per_target() -> None:
    model = mlp()
    config = [
        {"op_names": ["fc1"], "quant_dtype": "int4"},
        {
            "op_names": ["fc1"],
            "target_names": ["weight"],
            "quant_dtype": "uint8",
            "quant_scheme": "affine",
        },
    ]
    with pytest.warns(compress_core.ConfigWarning, match="overwrites"):
        comp = compress_core.create("ptq", model, config)
    model(torch.randn(4, 6))
    params = comp.compress()["fc1"]
    assert (params["weight"]["quant_dtype"], params["weight"]["quant_scheme"]) == (
        "uint8",
        "affine",
    )
    assert params["_input_0"]["quant_dtype"] == "int4"


def test_percentile_and_mse_observers_ignore_an_outlier() -> None:
    torch.manual_seed(0)
    x = torch.randn(4096, 6)
    x[0, 0] = 1000.0
    scales = {}
    for observer in ("minmax", "percentile", "mse"):
        model = mlp()
        comp = compress_core.create(
            "ptq",
            model,
            [
                {
                    "op_names": ["fc1"],
                    "target_names": ["_input_"],
                    "target_settings": {"_input_": {"observer": observer}},
                }
            ],
        )
        model(x)
        scales[observer] = comp.compress()["fc1"]["_input_0"]["scale"].item()
    assert scales["minmax"] == pytest.approx(1000.0 / 127)
    # 99.99th percentile of 24576 values: the outlier is excluded.
    flat = x.flatten().sort().values
    hi = flat[round(0.9999 * (flat.numel() - 1))]
    lo = flat[round(0.0001 * (flat.numel() - 1))]
    assert scales["percentile"] == pytest.approx(max(hi.item(), -lo.item()) / 127, rel=1e-5)


def test_mse_observer_finds_a_clipping_range_with_less_error() -> None:
    # A heavy-tailed (Laplace) activation at 4 bits: clipping the tail costs less than
    # coarse steps (Banner et al. 2019 put the optimum near 5b for 4 bits).
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((4096, 6))
    results = {}
    for observer in ("minmax", "mse"):
        model = mlp()
        comp = compress_core.create(
            "ptq",
            model,
            [
                {
                    "op_names": ["fc1"],
                    "target_names": ["_input_"],
                    "quant_dtype": "int4",
                    "target_settings": {"_input_": {"observer": observer}},
                }
            ],
        )
        model(x)
        scale = comp.compress()["fc1"]["_input_0"]["scale"].item()
        results[observer] = (
            scale,
            (ref_fq(x, scale, 0, -7, 7) - x.double()).square().mean().item(),
        )
    assert results["mse"][0] < 0.75 * results["minmax"][0]
    assert results["mse"][1] < 0.8 * results["minmax"][1]


def test_unknown_observer_is_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        compress_core.create(
            "ptq", mlp(), [{"op_names": ["fc1"], "target_settings": {"weight": {"observer": "kl"}}}]
        )
    assert info.value.key == "target_settings.weight.observer"


def test_uncalibrated_activation_raises_on_compress() -> None:
    comp = compress_core.create("ptq", mlp(), [{"op_names": ["fc1"]}])
    with pytest.raises(RuntimeError, match="calibration"):
        comp.compress()


def test_state_lives_in_state_dict_and_unwrap_restores() -> None:
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    comp = compress_core.create("ptq", model, [{"op_names": ["fc1"]}])
    model(torch.randn(3, 6))
    comp.compress()
    keys = set(model.state_dict())
    assert {"fc1.weight__quantization_scale", "fc1._output___quantization_zero_point"} <= keys
    unwrap(model)
    after = model.state_dict()
    assert set(after) == set(before)
    for key, value in before.items():
        assert torch.equal(after[key], value)


# -- qat --------------------------------------------------------------------------------------


def test_qat_ema_first_value_as_is_then_decay() -> None:
    model = mlp()
    comp = compress_core.create("qat", model, [{"op_names": ["fc1"], "target_names": ["_input_"]}])
    model.train()
    model(torch.full((2, 6), 2.0))
    model(torch.full((2, 6), 4.0))
    amax = 0.99 * 2.0 + 0.01 * 4.0
    assert comp.compress()["fc1"]["_input_0"]["scale"].item() == pytest.approx(amax / 127)


def test_qat_quant_start_step_and_straight_through_gradient() -> None:
    model = mlp()
    comp = compress_core.create(
        "qat", model, [{"op_names": ["fc1"], "target_names": ["weight"]}], quant_start_step=2
    )
    x = torch.randn(8, 6)
    reference = mlp()
    torch.testing.assert_close(model(x), reference(x))  # step 0: observe only
    comp.step()
    comp.step()
    out = model(x)
    w = model.fc1.weight.detach()
    scale = w.abs().max() / 127
    expected = reference.fc2(
        reference.act(
            F.linear(
                x.double(), ref_fq(w, scale, 0, -127, 127), reference.fc1.bias.double()
            ).float()
        )
    )
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    out.sum().backward()
    # Straight-through: d out / d w is the float layer's gradient evaluated at the quantized weight.
    w_q = ref_fq(w, scale, 0, -127, 127).float().requires_grad_()
    ref_out = reference.fc2(reference.act(F.linear(x, w_q, reference.fc1.bias)))
    ref_out.sum().backward()
    torch.testing.assert_close(model.fc1.weight.grad, w_q.grad, atol=1e-5, rtol=1e-5)


def test_qat_trains_with_the_users_optimizer() -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # built before create: still valid
    comp = compress_core.create("qat", model, [{"op_types": ["Linear"]}])
    x = torch.randn(64, 6)
    y = x @ torch.randn(6, 3)
    model.train()
    losses = []
    for _ in range(60):
        optimizer.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        comp.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# -- fuse_names ------------------------------------------------------------------------------


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


def conv_bn() -> ConvBN:
    torch.manual_seed(0)
    model = ConvBN()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.2, 0.2)
    return model.eval()


def test_fuse_conv_bn_relu_folds_and_quantizes_the_group_output() -> None:
    model = conv_bn()
    x = torch.randn(4, 2, 6, 6)
    config = [
        {
            "op_names": ["conv"],
            "granularity": "per_channel",
            "target_settings": {
                "_input_": {"granularity": "default"},
                "_output_": {"granularity": "default"},
            },
            "fuse_names": [["conv", "bn", "relu"]],
        }
    ]
    comp = compress_core.create("ptq", model, config)
    model(x)
    params = comp.compress()["conv"]
    bn = model.bn
    k = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().double()
    w_fold = model.conv.weight.detach().double() * k.reshape(-1, 1, 1, 1)
    b_fold = (
        model.conv.bias.detach().double() - bn.running_mean.double()
    ) * k + bn.bias.detach().double()
    torch.testing.assert_close(
        params["weight"]["scale"].double(), w_fold.abs().amax((1, 2, 3)) / 127
    )
    y = F.relu(F.conv2d(x.double(), w_fold, b_fold))
    # The group's output is the ReLU's output.
    assert params["_output_"]["scale"].item() == pytest.approx(y.abs().max().item() / 127, rel=1e-5)
    w_q = ref_fq(w_fold, params["weight"]["scale"].reshape(-1, 1, 1, 1), 0, -127, 127)
    x_q = ref_fq(x, params["_input_0"]["scale"], 0, -127, 127)
    expected = ref_fq(F.relu(F.conv2d(x_q, w_q, b_fold)), params["_output_"]["scale"], 0, -127, 127)
    torch.testing.assert_close(model(x).double(), expected, atol=1e-5, rtol=0)


def test_absorbed_module_cannot_be_configured() -> None:
    model = conv_bn()
    config = [
        {"op_names": ["conv"], "fuse_names": [["conv", "bn", "relu"]]},
        {"op_names": ["relu"]},
    ]
    with pytest.raises(ConfigError) as info:
        compress_core.create("ptq", model, config)
    message = str(info.value)
    assert "'relu' is fused into 'conv'" in message and "config_list[1]" in message
    assert info.value.key == "fuse_names[0]"
    assert not hasattr(model.conv, "_compress_wrapper")


def test_fuse_group_must_be_conv_then_batchnorm() -> None:
    with pytest.raises(ConfigError, match="second module must be BatchNorm"):
        compress_core.create(
            "ptq", conv_bn(), [{"op_names": ["conv"], "fuse_names": [["conv", "relu"]]}]
        )


# -- lsq / lsq_plus / dorefa / bnn ---------------------------------------------------------------


def test_lsq_initialises_and_learns_the_step_size() -> None:
    model = mlp()
    comp = compress_core.create("lsq", model, [{"op_names": ["fc1"], "target_names": ["weight"]}])
    params = list(comp.parameters())
    assert len(params) == 1 and params[0].requires_grad
    x = torch.randn(16, 6)
    out = model(x)
    w = model.fc1.weight.detach()
    # LSQ initialisation: 2 * mean|w| / sqrt(Qp).
    assert params[0].item() == pytest.approx(2 * w.abs().mean().item() / math.sqrt(127), rel=1e-5)
    out.sum().backward()
    assert params[0].grad is not None and params[0].grad.abs().item() > 0
    before = params[0].item()
    torch.optim.SGD(params, lr=0.01).step()
    assert params[0].item() != before
    assert comp.compress()["fc1"]["weight"]["scale"].item() == pytest.approx(params[0].item())


def test_lsq_plus_learns_zero_point_too() -> None:
    model = mlp()
    comp = compress_core.create(
        "lsq_plus", model, [{"op_names": ["fc1"], "target_names": ["_input_"]}]
    )
    params = list(comp.parameters())
    assert len(params) == 2
    x = torch.rand(16, 6) + 1.0  # min 1.0 -> widened to 0; affine int8
    model(x).sum().backward()
    scale, zero_point = params
    assert scale.item() == pytest.approx(x.max().item() / 254, rel=1e-5)
    assert zero_point.item() == -127
    assert scale.grad is not None


def test_lsq_rejects_block_granularity() -> None:
    with pytest.raises(ConfigError, match="per-tensor"):
        compress_core.create(
            "lsq", mlp(), [{"op_names": ["fc1"], "target_names": ["weight"], "granularity": [1, 2]}]
        )


def test_dorefa_weights_and_activations_follow_the_paper() -> None:
    model = mlp()
    compress_core.create("dorefa", model, [{"op_names": ["fc1"], "quant_dtype": "int2"}])
    x = torch.randn(8, 6)
    out = model.fc1(x)
    w = model.fc1.weight.detach().double()
    n = 3  # 2 bits
    t = torch.tanh(w)
    t = t / (2 * t.abs().max()) + 0.5
    w_q = 2 * torch.round(t * n) / n - 1
    x_q = torch.round(x.double().clamp(0, 1) * n) / n
    y = F.linear(x_q, w_q, model.fc1.bias.double())
    expected = torch.round(y.clamp(0, 1) * n) / n
    torch.testing.assert_close(out.double(), expected, atol=1e-6, rtol=0)


def test_bnn_binarizes_weights_and_activations() -> None:
    model = mlp()
    compress_core.create("bnn", model, [{"op_names": ["fc1"]}])
    x = torch.randn(8, 6, requires_grad=True)
    out = model.fc1(x)

    def sign(t: torch.Tensor) -> torch.Tensor:
        return torch.where(t >= 0, 1.0, -1.0)

    expected = sign(
        F.linear(sign(x.detach()), sign(model.fc1.weight.detach()), model.fc1.bias.detach())
    )
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert x.grad is not None


def test_nni_aliases_are_registered() -> None:
    names = {
        m["name"]: set(m["aliases"])
        for m in compress_core.list_methods()
        if m["kind"] == "quantization"
    }
    assert names == {
        "ptq": {"PtqQuantizer"},
        "qat": {"QATQuantizer"},
        "lsq": {"LsqQuantizer"},
        "lsq_plus": {"LsqPlusQuantizer"},
        "dorefa": {"DoReFaQuantizer"},
        "bnn": {"BNNQuantizer"},
    }
    model = mlp()
    comp = compress_core.create("QATQuantizer", model, [{"op_names": ["fc1"]}])
    assert comp.method == "qat"


# -- distributed ------------------------------------------------------------------------------


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        model = mlp()
        comp = compress_core.create(
            "ptq",
            model,
            [{"op_names": ["fc1"], "target_names": ["_input_"], "quant_scheme": "affine"}],
        )
        x = torch.zeros(4, 6)
        x[0, 0] = -1.0 if rank == 0 else 0.5
        x[1, 1] = 2.0 if rank == 0 else 3.0
        model(x)
        params = comp.compress()["fc1"]["_input_0"]
        torch.save(
            {"scale": params["scale"], "zero_point": params["zero_point"]},
            os.path.join(out_dir, f"{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_observers_are_reduced_across_ranks(tmp_path) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_rank_main, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    # Global min -1 (rank 0) and max 3 (rank 1): int8 affine scale 4/254, zp -127 - round(-1/s).
    scale = 4.0 / 254
    for result in results:
        assert result["scale"].item() == pytest.approx(scale)
        assert int(result["zero_point"]) == -127 - round(-1.0 / scale)
