"""Pruning, quantization and distillation on one model, in one training loop.

Two variants: with a tiny fake quantizer registered on a fresh :class:`PluginHost` (it logs
the exact tensor its handler receives, so the mask -> quantize -> record order is checked
bit for bit), and with the real ``qat`` method of the quantization plugin.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compress_core
from compress_core import (
    Compressor,
    Orchestrator,
    PluginHost,
    PluginRegistry,
    TargetRecord,
    hookimpl,
)
from compress_core.registry import ALLOW_ENV
from compress_core.wrapper import ModuleWrapper


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def mse64(s: torch.Tensor, t: torch.Tensor) -> float:
    return float(((s.detach().double() - t.detach().double()) ** 2).mean())


# -- a fake quantizer (marked: stands in for any quantization method) ---------------------------


class FakeQuantHandler:
    """Rounds to multiples of 1/8 and keeps what it was given."""

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def __call__(self, module: nn.Module, value: torch.Tensor) -> torch.Tensor:
        self.seen.append(value.detach().clone())
        return value + (torch.round(value * 8) / 8 - value).detach()  # straight-through

    def bake(self, module: nn.Module, value: torch.Tensor) -> torch.Tensor:
        return torch.round(value * 8) / 8


class FakeQuantizer(Compressor):
    kind = "quantization"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handlers: dict[tuple[str, str], FakeQuantHandler] = {}

    def make_handler(self, module: nn.Module, wrapper: ModuleWrapper, record: TargetRecord) -> FakeQuantHandler:
        handler = FakeQuantHandler()
        self.handlers[(record.module_name, record.target_name)] = handler
        return handler

    def compress(self) -> dict[str, Any]:
        return {name: {target: {"step": 0.125}} for name, target in self.handlers}


@hookimpl
def compress_register_methods(registry: PluginRegistry) -> None:
    registry.add_method("fake_quant", FakeQuantizer, summary="test-only quantizer on a 1/8 grid")


@pytest.fixture
def host() -> PluginHost:
    host = PluginHost()
    host.load_entry_points(environ={ALLOW_ENV: "pruning,distillation"})
    host.register(__import__(__name__, fromlist=["compress_register_methods"]), "fake_quantization")
    return host


def models() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    teacher = Mlp()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return teacher, student


class EffectiveWeight:
    """A pre-hook added after the wrapper's: sees the weight the forward really uses."""

    def __init__(self, module: nn.Module) -> None:
        self.value: torch.Tensor | None = None
        module.register_forward_pre_hook(self)

    def __call__(self, module: nn.Module, args: Any) -> None:
        self.value = module.weight.detach().clone()


def test_prune_fake_quantize_and_distil_in_one_loop(host):
    teacher, student = models()
    orch = Orchestrator(student, host=host)
    prune = orch.add("level", [{"op_names": ["fc1"], "sparse_ratio": 0.5}])
    quant = orch.add("fake_quant", [{"op_names": ["fc1"], "target_names": ["weight"]}])
    distil = orch.add(
        "dynamic_layerwise",
        [{"op_names": ["fc1"], "lambda": 2}, {"op_names": ["fc2"], "apply_method": "kl"}],
        teacher=teacher,
    )
    masks = prune.compress()
    mask = masks["fc1"]["weight"]
    assert int((~mask).sum()) == 24
    effective = EffectiveWeight(student.fc1)
    initial = student.fc1.weight.detach().clone()
    optimizer = torch.optim.SGD([*student.parameters(), *orch.parameters()], lr=0.05)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    for _ in range(4):
        optimizer.zero_grad()
        hidden = student.fc1(x)  # called once more, below, by the model: the last call counts
        out = student(x)
        loss = F.cross_entropy(out, y) + orch.loss()
        distil_value = distil.loss()
        weight = student.fc1.weight.detach().clone()
        handler = quant.handlers[("fc1", "weight")]

        # Pruning: the quantizer received exactly the masked weight, and the forward used
        # its rounding, so masked positions contribute nothing.
        assert torch.equal(handler.seen[-1], weight * mask)
        assert torch.equal(effective.value, torch.round(weight * mask * 8) / 8)
        assert torch.all(effective.value[~mask] == 0)
        # Distillation: recorded after mask and quantization, compared with the plain teacher.
        used = F.linear(x, effective.value, student.fc1.bias.detach())
        assert torch.allclose(hidden, used, atol=1e-6)
        with torch.no_grad():
            t_hidden, t_out = teacher.fc1(x), teacher(x)
            s_log = (out.double() / 2).log_softmax(-1)
            t_prob = (t_out.double() / 2).softmax(-1)
            kl = float((t_prob * (t_prob.log() - s_log)).sum() / x.shape[0] * 4)
        assert distil_value.item() == pytest.approx(2 * mse64(used, t_hidden) + kl, rel=1e-5)

        loss.backward()
        optimizer.step()
        orch.step()
    # The loop trained the student (the checks above held at every step).
    assert not torch.equal(student.fc1.weight.detach(), initial)
    result = orch.compress()
    assert set(result) == {"level", "fake_quant", "dynamic_layerwise"}
    assert set(result["dynamic_layerwise"]) == {"fc1", "fc2"}


def test_prune_qat_and_distil_in_one_loop():
    if "qat" not in {m["name"] for m in compress_core.list_methods()}:
        pytest.skip("the quantization plugin does not register 'qat' here")
    teacher, student = models()
    orch = Orchestrator(student)
    prune = orch.add("level", [{"op_names": ["fc1"], "sparse_ratio": 0.5}])
    orch.add("qat", [{"op_names": ["fc1"], "target_names": ["weight"]}])
    distil = orch.add("dynamic_layerwise", [{"op_names": ["fc2"]}], teacher=teacher)
    mask = prune.compress()["fc1"]["weight"]
    effective = EffectiveWeight(student.fc1)
    optimizer = torch.optim.SGD([*student.parameters(), *orch.parameters()], lr=0.05)
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        optimizer.zero_grad()
        out = student(x)
        masked = student.fc1.weight.detach() * mask
        # int8 symmetric (design.md): levels k * scale with |k| <= 127, scale = max|w| / 127.
        scale = masked.abs().max() / 127
        assert torch.all(effective.value[~mask] == 0)
        assert not torch.equal(effective.value, masked)
        assert torch.allclose(effective.value, torch.round(masked / scale) * scale, atol=1e-6)
        with torch.no_grad():
            expected = mse64(out, teacher(x))
        assert distil.loss().item() == pytest.approx(expected, rel=1e-5)
        (out.pow(2).mean() + orch.loss()).backward()
        optimizer.step()
        orch.step()
    assert set(orch.compress()) == {"level", "qat", "dynamic_layerwise"}
