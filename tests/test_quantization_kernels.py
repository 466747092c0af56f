"""The CPU fake-quantization path against torch's own fused kernels, bit for bit."""

from __future__ import annotations

import pytest
import torch

from compress_core.quantization import QuantParams, fake_quantize


def _reference_per_tensor(value: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int):
    ref_in = value.detach().clone().requires_grad_()
    out = torch.fake_quantize_per_tensor_affine(
        ref_in, torch.tensor(scale), torch.tensor(zero_point, dtype=torch.int32), qmin, qmax
    )
    return out, ref_in


@pytest.mark.parametrize(
    ("spread", "zero_point", "qmin", "qmax"),
    [
        (1.0, 0, -127, 127),  # nothing clipped: the mask-free branch
        (3.0, 0, -127, 127),  # a third of the values clipped on both sides
        (2.0, 128, 0, 255),  # uint8, symmetric zero point
        (2.0, 37, 0, 255),  # affine zero point
        (1.5, -3, -7, 7),  # int4
    ],
)
def test_per_tensor_matches_torch_fused_kernel(spread, zero_point, qmin, qmax):
    torch.manual_seed(0)
    scale = 0.0123
    # Uniform over the grid (times ``spread``), plus values on half steps, where the rounding
    # direction matters.
    center, half = (qmin + qmax) / 2 - zero_point, (qmax - qmin) / 2
    value = (center + (torch.rand(256, 300) * 2 - 1) * half * 0.99 * spread) * scale
    value[0, :3] = (round(center) + torch.tensor([0.5, 1.5, -2.5])) * scale
    value.requires_grad_()
    params = QuantParams(
        scale=torch.tensor(scale), zero_point=torch.tensor(float(zero_point)), qmin=qmin, qmax=qmax
    )
    out = fake_quantize(value, params)
    ref, ref_in = _reference_per_tensor(value, scale, zero_point, qmin, qmax)
    assert torch.equal(out, ref)
    grad = torch.randn_like(value)
    out.backward(grad)
    ref.backward(grad)
    assert torch.equal(value.grad, ref_in.grad)
    clipped = (ref_in.grad == 0).sum().item()
    assert (clipped > 0) == (spread > 1.0)


@pytest.mark.parametrize("spread", [1.0, 3.0])
def test_per_channel_matches_torch_per_channel_kernel(spread):
    torch.manual_seed(1)
    scale = torch.rand(16) * 0.05 + 0.001
    zero_point = torch.zeros(16)
    value = (torch.randn(16, 40) * spread * 127 * scale[:, None]).requires_grad_()
    params = QuantParams(scale=scale, zero_point=zero_point, qmin=-127, qmax=127, axis=0)
    out = fake_quantize(value, params)
    ref_in = value.detach().clone().requires_grad_()
    ref = torch.fake_quantize_per_channel_affine(
        ref_in, scale, zero_point.to(torch.int32), 0, -127, 127
    )
    # torch's per-channel kernel multiplies by 1/scale and this path divides by the scale, so
    # an element whose quotient lands within an ulp of a half step may round the other way
    # (one level, i.e. one scale, apart); everything else is equal and so is the gradient mask.
    diff = (out - ref).abs()
    one_level = (diff - scale[:, None]).abs() < 1e-6
    assert bool(((diff == 0) | one_level).all())
    assert (diff > 0).float().mean() < 1e-3
    grad = torch.randn_like(value)
    out.backward(grad)
    ref.backward(grad)
    assert torch.equal(value.grad, ref_in.grad)


# -- the skipped clipping check of QAT weights ------------------------------------------------


def _weight_reference(weight: torch.Tensor, scale: torch.Tensor, x: torch.Tensor):
    """Forward output and weight gradient of ``x @ fq(w).T`` through torch's fused kernel."""
    ref_w = weight.detach().clone().requires_grad_()
    fq = torch.fake_quantize_per_tensor_affine(
        ref_w, scale.reshape(()), torch.tensor(0, dtype=torch.int32), -127, 127
    )
    out = x @ fq.T
    out.sum().backward()
    return out.detach(), ref_w.grad


def test_qat_weight_reobserved_after_in_place_step_and_matches_fused_kernel():
    import compress_core

    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False))
    compress_core.create("qat", model, [{"op_names": ["0"], "target_names": ["weight"]}])
    layer = model[0]
    x = torch.randn(8, 64)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        weight = layer.weight.detach().clone()
        # The scale is this step's own range: amax / 127 of the current weight.
        scale = (weight.abs().max() / 127).to(torch.float32)
        out = model(x)
        ref_out, ref_grad = _weight_reference(weight, scale, x)
        torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
        optimizer.zero_grad()
        out.sum().backward()
        torch.testing.assert_close(layer.weight.grad, ref_grad, rtol=0, atol=0)
        version = layer.weight._version
        optimizer.step()  # in place: a new range for the next forward
        assert layer.weight._version > version
        buffers = {n: b for n, b in layer.named_buffers() if n.endswith("scale")}
        (stored,) = buffers.values()
        torch.testing.assert_close(stored, scale, rtol=0, atol=0)


def test_frozen_weight_changed_in_place_is_still_clipped():
    import compress_core

    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8, bias=False))
    comp = compress_core.create("qat", model, [{"op_names": ["0"], "target_names": ["weight"]}])
    layer = model[0]
    comp.compress()  # freeze() observes the untouched weight
    scale = (layer.weight.detach().abs().max() / 127).to(torch.float32)
    with torch.no_grad():
        layer.weight.mul_(3.0)  # same tensor object, now beyond the frozen range
    x = torch.randn(4, 16)
    out = model(x)
    out.sum().backward()
    ref_out, ref_grad = _weight_reference(layer.weight, scale, x)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    # Clipped elements get no gradient (two thirds of the tripled range lie outside).
    assert (ref_grad == 0).any()
    torch.testing.assert_close(layer.weight.grad, ref_grad, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("qmin", "qmax", "zero_point"), [(-127, 127, 0), (0, 255, 128), (-7, 7, 0)]
)
def test_in_range_is_the_same_result_for_a_tensor_within_its_own_symmetric_range(
    qmin, qmax, zero_point
):
    torch.manual_seed(3)
    value = torch.randn(300, 200) * 0.37
    steps = min(qmax - zero_point, zero_point - qmin)
    scale = (value.abs().max() / steps).to(torch.float32)
    params = QuantParams(
        scale=scale, zero_point=torch.tensor(float(zero_point)), qmin=qmin, qmax=qmax
    )
    outs, grads = [], []
    for in_range in (False, True):
        v = value.clone().requires_grad_()
        out = fake_quantize(v, params, in_range=in_range)
        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
        outs.append(out.detach())
        grads.append(v.grad)
    ref_out, ref_in = _reference_per_tensor(value, float(scale), zero_point, qmin, qmax)
    ref_out.backward(torch.linspace(-1, 1, ref_out.numel()).reshape(ref_out.shape))
    for out, grad in zip(outs, grads):
        torch.testing.assert_close(out, ref_out.detach(), rtol=0, atol=0)
        torch.testing.assert_close(grad, ref_in.grad, rtol=0, atol=0)


def test_qat_activation_beyond_its_ema_range_is_clipped_within_it_is_not():
    import compress_core

    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8))
    compress_core.create(
        "qat", model, [{"op_names": ["0"], "target_names": ["_input_"]}], ema_decay=0.9
    )
    layer = model[0]
    x1 = torch.randn(32, 16)
    lo, hi = x1.min(), x1.max()
    model(x1)
    for factor, clipped in ((3.0, True), (0.5, False)):
        x = (x1 * factor).requires_grad_()
        lo = torch.lerp(x.detach().min(), lo, 0.9)
        hi = torch.lerp(x.detach().max(), hi, 0.9)
        scale = (torch.maximum(lo.abs(), hi.abs()) / 127).to(torch.float32)
        out = model(x)
        out.sum().backward()
        ref_x = x.detach().clone().requires_grad_()
        fq = torch.fake_quantize_per_tensor_affine(
            ref_x, scale, torch.tensor(0, dtype=torch.int32), -127, 127
        )
        ref = torch.nn.functional.linear(fq, layer.weight.detach(), layer.bias.detach())
        ref.sum().backward()
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        torch.testing.assert_close(x.grad, ref_x.grad, rtol=0, atol=0)
        assert bool((ref_x.grad == 0).any()) == clipped


# -- the clipping check from observed bounds ---------------------------------------------------


def _fq_with_grad(value: torch.Tensor, params: QuantParams, **kwargs):
    v = value.detach().clone().requires_grad_()
    out = fake_quantize(v, params, **kwargs)
    out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
    return out.detach(), v.grad


@pytest.mark.parametrize(
    ("edges", "clipped"),
    [
        # A scale of 2^-7: x * (1/s) is exact, so these land on half steps of the grid.
        ((-126.5, 126.5), False),  # half steps round to the even 126: nothing leaves [-127, 127]
        ((-127.0, 127.0), False),  # exactly the grid's ends
        ((-127.25, 127.49), False),
        ((-126.0, 127.5), True),  # 127.5 rounds to 128
        ((-127.5, 100.0), True),  # -127.5 rounds to -128
        ((-300.0, 300.0), True),
    ],
)
def test_value_range_shortcut_is_bitwise_the_general_path(edges, clipped):
    torch.manual_seed(5)
    scale = 2.0**-7
    lo, hi = edges
    grid = torch.rand(64, 50) * (hi - lo) + lo
    grid[0, :2] = torch.tensor([lo, hi])
    grid[1, :4] = torch.tensor([0.5, -0.5, 1.5, -2.5])
    value = grid * scale
    params = QuantParams(scale=torch.tensor(scale), zero_point=torch.tensor(0.0), qmin=-127, qmax=127)
    bounds = (float(value.min()), float(value.max()))
    fast_out, fast_grad = _fq_with_grad(value, params, value_range=bounds)
    out, grad = _fq_with_grad(value, params)
    ref_out, ref_in = _reference_per_tensor(value, scale, 0, -127, 127)
    ref_out.backward(torch.linspace(-1, 1, ref_out.numel()).reshape(ref_out.shape))
    for o, g in ((fast_out, fast_grad), (out, grad)):
        torch.testing.assert_close(o, ref_out.detach(), rtol=0, atol=0)
        torch.testing.assert_close(g, ref_in.grad, rtol=0, atol=0)
    assert bool((ref_in.grad == 0).any()) == clipped


def test_range_in_grid_agrees_with_the_rounded_tensor_on_random_scales():
    from compress_core.quantization import _range_in_grid

    generator = torch.Generator().manual_seed(6)
    disagreements = 0
    outcomes = set()
    for _ in range(300):
        scale = float(torch.rand((), generator=generator) * 0.1 + 1e-4)
        # Ranges around the grid's ends, so that both answers occur often.
        value = torch.randn(500, generator=generator) * scale * 127 * 0.34
        zero = int(torch.randint(-3, 4, (), generator=generator))
        low, high = -127.0 - zero, 127.0 - zero
        params = QuantParams(
            scale=torch.tensor(scale), zero_point=torch.tensor(float(zero)), qmin=-127, qmax=127
        )
        s = params.scale.to(torch.float32)
        q = torch.round(value * torch.reciprocal(s))  # the kernel's grid values, before clamping
        expected = bool(q.min() >= low) and bool(q.max() <= high)
        inv = float(torch.reciprocal(s))
        got = _range_in_grid((float(value.min()), float(value.max())), inv, low, high)
        disagreements += got != expected
        outcomes.add(expected)
        out, grad = _fq_with_grad(value, params, value_range=(float(value.min()), float(value.max())))
        ref_out, ref_grad = _fq_with_grad(value, params)
        assert torch.equal(out, ref_out) and torch.equal(grad, ref_grad)
    assert disagreements == 0
    assert outcomes == {True, False}


def test_range_in_grid_refuses_non_finite_bounds_and_scales():
    from compress_core.quantization import _range_in_grid

    assert not _range_in_grid((float("nan"), 1.0), 10.0, -127, 127)
    assert not _range_in_grid((-1.0, float("inf")), 10.0, -127, 127)
    assert not _range_in_grid((-1.0, 1.0), float("inf"), -127, 127)
    assert not _range_in_grid((-1.0, 1.0), 1e39, -127, 127)  # products beyond float32
    assert _range_in_grid((-1.0, 1.0), 127.0, -127, 127)
    assert not _range_in_grid((-1.0, 1.0), 127.5, -127, 127)  # 127.5 rounds to 128
