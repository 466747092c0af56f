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
