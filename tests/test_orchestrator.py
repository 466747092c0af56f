"""The orchestrator: several compressors on one model, the rules across them, the loop facade.

Fake quantization and distillation methods are registered by a fake plugin on a fresh
:class:`PluginHost` that also loads the real built-in ``pruning`` entry point.
"""

from __future__ import annotations

import itertools
import warnings
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import compress_core
from compress_core import (
    Compressor,
    ConfigError,
    ConfigWarning,
    Orchestrator,
    PluginHost,
    PluginRegistry,
    Pruner,
    TargetRecord,
    hookimpl,
    unwrap,
)
from compress_core.registry import ALLOW_ENV
from compress_core.wrapper import ModuleWrapper, get_wrapper

# -- fake methods ----------------------------------------------------------------------------

CALLS: list[tuple[str, str]] = []
"""(kind, target) of every handler call, in order."""


def fake_round(value: torch.Tensor) -> torch.Tensor:
    """The fake quantizer's grid: multiples of 1/4."""
    return torch.round(value * 4) / 4


class RoundHandler:
    def __init__(self, target: str) -> None:
        self.target = target

    def __call__(self, module: nn.Module, value: torch.Tensor) -> torch.Tensor:
        CALLS.append(("quantization", self.target))
        return fake_round(value)

    def bake(self, module: nn.Module, value: torch.Tensor) -> torch.Tensor:
        return fake_round(value)


class FakeQuantizer(Compressor):
    kind = "quantization"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.scale = nn.Parameter(torch.tensor(0.25))
        self.steps = 0

    def make_handler(
        self, module: nn.Module, wrapper: ModuleWrapper, record: TargetRecord
    ) -> RoundHandler:
        return RoundHandler(record.target_name)

    def loss(self) -> torch.Tensor:
        return torch.tensor(0.25)

    def step(self) -> None:
        self.steps += 1

    def parameters(self):
        yield self.scale

    def compress(self) -> dict[str, Any]:
        return {r.module_name: {r.target_name: {"scale": 0.25}} for r in self.records}


class RecordHandler:
    def __init__(self, owner: FakeDistiller, key: str) -> None:
        self.owner = owner
        self.key = key

    def __call__(self, module: nn.Module, value: torch.Tensor) -> torch.Tensor:
        CALLS.append(("distillation", self.key.split(".")[-1]))
        self.owner.recorded[self.key] = value.detach().clone()
        return value

    def bake(self, module: nn.Module, value: torch.Tensor) -> torch.Tensor:
        return value


class FakeDistiller(Compressor):
    kind = "distillation"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.recorded: dict[str, torch.Tensor] = {}
        self.adapter = nn.Parameter(torch.ones(2))
        self.steps = 0

    def make_handler(
        self, module: nn.Module, wrapper: ModuleWrapper, record: TargetRecord
    ) -> RecordHandler:
        return RecordHandler(self, f"{record.module_name}.{record.target_name}")

    def loss(self) -> torch.Tensor:
        return torch.tensor(1.5)

    def step(self) -> None:
        self.steps += 1

    def parameters(self):
        yield self.adapter

    def compress(self) -> dict[str, Any]:
        return {"recorded": sorted(self.recorded)}


class MaskHandlerSpy:
    """Wraps the level pruner's handler to log its calls."""

    def __init__(self, inner: Any, target: str) -> None:
        self.inner = inner
        self.target = target

    def __call__(self, module: nn.Module, value: torch.Tensor) -> torch.Tensor:
        CALLS.append(("pruning", self.target))
        return self.inner(module, value)

    def bake(self, module: nn.Module, value: torch.Tensor) -> torch.Tensor:
        return self.inner.bake(module, value)


class MagnitudePruner(Pruner):
    """``|w|`` like ``level``, logging its handler calls."""

    default_granularity = "element"

    def metric(
        self, record: TargetRecord, value: torch.Tensor, block: tuple[int, ...]
    ) -> torch.Tensor:
        return value.abs()

    def make_handler(self, module: nn.Module, wrapper: ModuleWrapper, record: TargetRecord) -> Any:
        return MaskHandlerSpy(super().make_handler(module, wrapper, record), record.target_name)


class FlakyCompressor(Compressor):
    """Registers state for every record and fails on the second one."""

    kind = "quantization"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls = 0

    def make_handler(
        self, module: nn.Module, wrapper: ModuleWrapper, record: TargetRecord
    ) -> RoundHandler:
        self.calls += 1
        wrapper.register_state(module, record.target_name, self.kind, "scale", torch.ones(1))
        wrapper.register_state(
            module, record.target_name, self.kind, "learned", torch.ones(1), trainable=True
        )
        if self.calls == 2:
            raise RuntimeError("make_handler failed on the 2nd record")
        return RoundHandler(record.target_name)


class FlakyPruner(MagnitudePruner):
    def make_handler(self, module: nn.Module, wrapper: ModuleWrapper, record: TargetRecord) -> Any:
        handler = super().make_handler(module, wrapper, record)
        if len(self._handlers) == 2:
            raise RuntimeError("pruner failed on the 2nd record")
        return handler


class RejectingCompressor(Compressor):
    kind = "quantization"

    def validate(self) -> None:
        raise ConfigError("this method rejects every config", entry=0)


@hookimpl
def compress_register_methods(registry: PluginRegistry) -> None:
    for name, cls in (
        ("fake_quant", FakeQuantizer),
        ("fake_record", FakeDistiller),
        ("magnitude", MagnitudePruner),
        ("flaky", FlakyCompressor),
        ("flaky_prune", FlakyPruner),
        ("rejecting", RejectingCompressor),
    ):
        registry.add_method(name, cls, summary=f"test double {name}")


FAKES = SimpleNamespace(compress_register_methods=compress_register_methods)


@pytest.fixture
def host() -> PluginHost:
    host = PluginHost()
    host.load_entry_points(environ={ALLOW_ENV: "pruning"})
    host.register(FAKES, "fakes")
    assert host.plugins["fakes"].status == "ok"
    CALLS.clear()
    return host


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 4)
        self.fc2 = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def model_state(model: nn.Module) -> dict[str, Any]:
    """Everything the orchestrator could leave behind on a model."""
    state: dict[str, Any] = {}
    for name, module in model.named_modules():
        state[name] = {
            "dict": sorted(module.__dict__),
            "parameters": [(k, id(v)) for k, v in module._parameters.items()],
            "buffers": [(k, id(v)) for k, v in module._buffers.items()],
            "non_persistent": sorted(module._non_persistent_buffers_set),
            "hooks": [
                list(getattr(module, attr).items())
                for attr in (
                    "_forward_pre_hooks",
                    "_forward_hooks",
                    "_forward_hooks_always_called",
                    "_forward_pre_hooks_with_kwargs",
                    "_forward_hooks_with_kwargs",
                    "_load_state_dict_pre_hooks",
                    "_state_dict_hooks",
                )
            ],
            "wrapper": _wrapper_state(get_wrapper(module)),
        }
    state["<state_dict>"] = {k: v.clone() for k, v in model.state_dict().items()}
    return state


def _wrapper_state(wrapper: ModuleWrapper | None) -> Any:
    if wrapper is None:
        return None
    return (
        dict(wrapper.owners),
        {t: list(h) for t, h in wrapper.handlers.items()},
        sorted(wrapper.targets),
        list(wrapper.state_names),
    )


def assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    sd_a, sd_b = a.pop("<state_dict>"), b.pop("<state_dict>")
    assert a == b
    assert list(sd_a) == list(sd_b)
    for key in sd_a:
        assert torch.equal(sd_a[key], sd_b[key]), key


# -- failures leave the model as it was -----------------------------------------------------


@pytest.mark.parametrize("method", ["flaky", "flaky_prune"])
def test_failure_while_attaching_leaves_the_model_exactly_as_it_was(host, method):
    model = net()
    before = model_state(model)
    x = torch.randn(2, 6)
    expected = model(x)
    orch = Orchestrator(model, host=host)
    with pytest.raises(RuntimeError, match="2nd record"):
        orch.add(
            method,
            [{"op_types": ["Linear"], "target_names": ["weight"], "sparse_ratio": 0.5}]
            if method == "flaky_prune"
            else [{"op_types": ["Linear"], "target_names": ["weight"]}],
        )
    assert orch.compressors == []
    assert_same_state(model_state(model), before)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_failure_keeps_what_earlier_compressors_attached(host):
    model = net()
    orch = Orchestrator(model, host=host)
    pruner = orch.add("level", [{"op_names": ["fc1"], "sparse_ratio": 0.5}])
    masks = pruner.compress()
    before = model_state(model)
    # fc1 is wrapped already (its wrapper must survive), fc2 is not (its wrapper must go).
    with pytest.raises(RuntimeError, match="2nd record"):
        orch.add("flaky", [{"op_names": ["fc1", "fc2"], "target_names": ["weight"]}])
    assert_same_state(model_state(model), before)
    assert get_wrapper(model.fc2) is None
    assert orch.compressors == [pruner]
    x = torch.randn(2, 6)
    w1 = model.fc1.weight.detach() * masks["fc1"]["weight"]
    b1 = model.fc1.bias.detach() * masks["fc1"]["bias"]
    torch.testing.assert_close(model(x), model.fc2(F.relu(F.linear(x, w1, b1))))
    # The next add works normally.
    orch.add("fake_quant", [{"op_names": ["fc2"], "target_names": ["weight"]}])
    assert get_wrapper(model.fc2) is not None


@pytest.mark.parametrize(
    ("method", "config", "error"),
    [
        ("level", [{"op_names": ["fc1"], "sparse_ratio": 1.5}], ConfigError),
        ("level", [{"op_names": ["fc1"], "sparse_ration": 0.5}], ConfigError),
        (
            "level",
            [{"op_names": ["fc1"], "target_names": ["nothing"], "sparse_ratio": 0.5}],
            ConfigError,
        ),
        (
            "level",
            [{"op_names": ["fc1"], "sparse_ratio": 0.5}, {"op_types": "Linear"}],
            ConfigError,
        ),
        ("rejecting", [{"op_names": ["fc1"], "target_names": ["weight"]}], ConfigError),
        ("no_such_method", [{"op_names": ["fc1"]}], compress_core.UnknownMethodError),
    ],
)
def test_config_errors_are_raised_before_the_model_is_touched(host, method, config, error):
    model = net()
    before = model_state(model)
    with pytest.raises(error):
        Orchestrator(model, host=host).add(method, config)
    assert_same_state(model_state(model), before)


# -- rules across compressors ---------------------------------------------------------------


def test_second_compressor_of_the_same_kind_skips_configured_targets(host):
    model = net()
    orch = Orchestrator(model, host=host)
    first = orch.add("level", [{"op_names": ["fc1"], "sparse_ratio": 0.5}])
    with pytest.warns(ConfigWarning) as caught:
        second = orch.add("magnitude", [{"op_types": ["Linear"], "sparse_ratio": 0.25}])
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2  # fc1.weight and fc1.bias
    for target, message in zip(("weight", "bias"), messages):
        assert f"fc1.{target}" in message
        assert "'level'" in message and "'magnitude'" in message  # names both
        assert "config_list[0]" in message
    assert [(r.module_name, r.target_name) for r in second.records] == [
        ("fc2", "weight"),
        ("fc2", "bias"),
    ]
    assert get_wrapper(model.fc1).owner("weight", "pruning").startswith("'level'")
    assert get_wrapper(model.fc2).owner("weight", "pruning").startswith("'magnitude'")

    first_masks, second_masks = first.compress(), second.compress()
    assert set(first_masks) == {"fc1"} and set(second_masks) == {"fc2"}
    assert int((~first_masks["fc1"]["weight"]).sum()) == 12  # floor(24 * 0.5)
    assert int((~second_masks["fc2"]["weight"]).sum()) == 3  # floor(12 * 0.25)


def test_same_method_twice_skips_and_names_both_entries(host):
    model = net()
    orch = Orchestrator(model, host=host)
    orch.add("fake_quant", [{"op_names": ["fc1"], "target_names": ["weight"]}])
    with pytest.warns(
        ConfigWarning, match=r"fc1\.weight is configured for quantization by 'fake_quant' #1"
    ) as caught:
        second = orch.add(
            "fake_quant",
            [
                {"op_names": ["fc2"], "target_names": ["weight"]},
                {"op_names": ["fc1"], "target_names": ["weight"]},
            ],
        )
    assert len(caught) == 1 and "config_list[1]" in str(caught[0].message)
    assert [(r.module_name, r.target_name) for r in second.records] == [("fc2", "weight")]


def test_rule_holds_across_orchestrators_and_create(host):
    model = net()
    Orchestrator(model, host=host).add(
        "fake_quant", [{"op_names": ["fc1"], "target_names": ["weight"]}]
    )
    with pytest.warns(ConfigWarning, match="fake_quant"):
        other = Orchestrator(model, host=host).add(
            "fake_quant", [{"op_names": ["fc1"], "target_names": ["weight"]}]
        )
    assert other.records == []


def test_no_warning_for_different_kinds_on_one_target(host):
    model = net()
    orch = Orchestrator(model, host=host)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        orch.add("level", [{"op_names": ["fc1"], "sparse_ratio": 0.5}])
        orch.add("fake_quant", [{"op_names": ["fc1"], "target_names": ["weight"]}])
        orch.add("fake_record", [{"op_names": ["fc1"], "target_names": ["weight"]}])
    wrapper = get_wrapper(model.fc1)
    assert {k for (t, k) in wrapper.owners if t == "weight"} == {
        "pruning",
        "quantization",
        "distillation",
    }


ADDERS = {
    "prune": ("magnitude", [{"op_names": ["fc1"], "sparse_ratio": 0.5}]),
    "quant": ("fake_quant", [{"op_names": ["fc1"], "target_names": ["weight", "_output_"]}]),
    "record": ("fake_record", [{"op_names": ["fc1"], "target_names": ["weight", "_output_"]}]),
}


@pytest.mark.parametrize("order", list(itertools.permutations(ADDERS)))
def test_mask_then_quantize_then_record_whatever_the_order_added(host, order):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(6, 4))
    orch = Orchestrator(model, host=host)
    compressors = {key: orch.add(*ADDERS[key]) for key in order}
    masks = compressors["prune"].compress()
    weight_mask, bias_mask = masks["fc1"]["weight"], masks["fc1"]["bias"]
    assert 0 < int((~weight_mask).sum()) < weight_mask.numel()

    CALLS.clear()
    x = torch.randn(3, 6)
    out = model(x)

    weight = model.fc1.weight.detach()
    bias = model.fc1.bias.detach()
    quantized_weight = fake_round(weight * weight_mask)
    expected_out = fake_round(F.linear(x, quantized_weight, bias * bias_mask))
    recorded = compressors["record"].recorded
    assert torch.equal(recorded["fc1.weight"], quantized_weight)
    torch.testing.assert_close(recorded["fc1._output_"], expected_out)
    torch.testing.assert_close(out, expected_out)
    assert [c for c in CALLS if c[1] == "weight"] == [
        ("pruning", "weight"),
        ("quantization", "weight"),
        ("distillation", "weight"),
    ]
    assert [c for c in CALLS if c[1] == "_output_"] == [
        ("quantization", "_output_"),
        ("distillation", "_output_"),
    ]

    # Baking writes mask then quantization into the weight, and nothing else changes.
    unwrap(model, bake=True)
    assert torch.equal(model.fc1.weight.detach(), quantized_weight)
    assert torch.equal(model.fc1.bias.detach(), bias * bias_mask)


# -- the training-loop facade ----------------------------------------------------------------


def test_loss_step_parameters_compress_aggregate(host):
    model = net()
    orch = Orchestrator(model, host=host)
    assert orch.loss().shape == () and float(orch.loss()) == 0.0
    assert list(orch.parameters()) == []
    assert orch.compress() == {}

    level = orch.add("level", [{"op_names": ["fc1"], "sparse_ratio": 0.5}])
    quant = orch.add("fake_quant", [{"op_names": ["fc2"], "target_names": ["weight"]}])
    record = orch.add("fake_record", [{"op_names": ["fc2"], "target_names": ["_output_"]}])
    level2 = orch.add("level", [{"op_names": ["fc2"], "sparse_ratio": 0.25}])
    assert orch.compressors == [level, quant, record, level2]

    # Pruners add nothing; the fakes add 0.25 and 1.5.
    loss = orch.loss()
    assert loss.shape == () and float(loss) == pytest.approx(1.75)
    assert float(level.loss()) == 0.0
    params = list(orch.parameters())
    assert len(params) == 2 and params[0] is quant.scale and params[1] is record.adapter

    orch.step()
    orch.step()
    assert (quant.steps, record.steps) == (2, 2)

    model(torch.randn(2, 6))
    result = orch.compress()
    assert list(result) == ["level", "fake_quant", "fake_record", "level#2"]
    assert set(result["level"]) == {"fc1"} and set(result["level#2"]) == {"fc2"}
    assert int((~result["level"]["fc1"]["weight"]).sum()) == 12
    assert int((~result["level#2"]["fc2"]["weight"]).sum()) == 3
    assert result["fake_quant"] == {"fc2": {"weight": {"scale": 0.25}}}
    assert result["fake_record"] == {"recorded": ["fc2._output_"]}


def test_orchestrator_optimizer_trains_model_and_extra_parameters(host):
    model = net()
    orch = Orchestrator(model, host=host)
    orch.add("level", [{"op_names": ["fc1"], "sparse_ratio": 0.5}])
    record = orch.add("fake_record", [{"op_names": ["fc2"], "target_names": ["_output_"]}])
    optimizer = torch.optim.SGD([*model.parameters(), *orch.parameters()], lr=0.1)
    assert any(p is record.adapter for group in optimizer.param_groups for p in group["params"])
    x = torch.randn(4, 6)
    loss = model(x).pow(2).mean() + orch.loss()
    loss.backward()
    optimizer.step()
    orch.step()


def test_create_uses_the_process_wide_host():
    model = net()
    comp = compress_core.create("level", model, [{"op_names": ["fc1"], "sparse_ratio": 0.5}])
    assert comp.method == "level" and comp.model is model
    assert [r.module_name for r in comp.records] == ["fc1", "fc1"]
    unwrap(model)
