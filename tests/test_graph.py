"""Graph capture: nodes mapped to the user's modules, fallback tracer, the model left as it was."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from compress_core import CompressError
from compress_core.graph import capture


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Block()
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(8 * 4 * 4, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x))


def calls_by_op(graph):
    result = {}
    for node in graph.calls():
        result.setdefault(node.op, []).append(node)
    return result


def test_export_graph_maps_ops_to_modules_with_shapes():
    graph = capture(Net(), (torch.randn(2, 3, 4, 4),))
    assert graph.method == "export"
    ops = calls_by_op(graph)
    (conv,) = ops["conv2d"]
    assert (conv.weight_of, conv.module, conv.shape) == ("block.conv", "block.conv", (2, 8, 4, 4))
    (linear,) = ops["linear"]
    assert (linear.weight_of, linear.shape) == ("head.2", (2, 5))
    (relu,) = ops["relu"]
    assert relu.module == "block.act" and relu.weight_of is None
    # The weight operand is the parameter placeholder named by its fully-qualified name.
    weight = graph[conv.args[1].name]
    assert (weight.kind, weight.tensor_name) == ("parameter", "block.conv.weight")
    assert conv.name in weight.users and weight.name in conv.inputs
    assert graph.ops_of("block.conv") == [conv]
    inputs = [n for n in graph if n.kind == "input"]
    assert [n.shape for n in inputs] == [(2, 3, 4, 4)]


def test_capture_leaves_the_model_unchanged():
    model = Net()
    model.train()
    model.head[1].eval()  # a mixed state must come back as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [(name, id(p)) for name, p in model.named_parameters()]
    flags = {name: m.training for name, m in model.named_modules()}
    capture(model, (torch.randn(2, 3, 4, 4),))
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key  # BN running stats included
    assert [(name, id(p)) for name, p in model.named_parameters()] == params
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_falls_back_to_symbolic_trace_when_export_fails(monkeypatch):
    def broken_export(*args, **kwargs):
        raise RuntimeError("export unavailable")

    monkeypatch.setattr(torch.export, "export", broken_export)
    graph = capture(Net(), (torch.randn(2, 3, 4, 4),))
    assert graph.method == "symbolic_trace"
    ops = calls_by_op(graph)
    assert [n.weight_of for n in ops["conv2d"]] == ["block.conv"]
    assert [n.weight_of for n in ops["batch_norm"]] == ["block.bn"]
    assert [n.shape for n in ops["linear"]] == [(2, 5)]


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # neither tracer can follow a branch on tensor values
            return self.fc(x)
        return x


def test_error_names_both_tracers_when_both_fail(monkeypatch):
    def broken_export(*args, **kwargs):
        raise RuntimeError("export unavailable")

    monkeypatch.setattr(torch.export, "export", broken_export)
    with pytest.raises(CompressError) as info:
        capture(DataDependent(), (torch.randn(2, 4),))
    text = str(info.value)
    assert "torch.export.export failed with RuntimeError: export unavailable" in text
    assert "torch.fx.symbolic_trace failed with" in text


def test_example_inputs_must_be_a_tuple():
    with pytest.raises(CompressError, match=r"tuple of positional arguments.*\(x,\)"):
        capture(Net(), torch.randn(2, 3, 4, 4))  # type: ignore[arg-type]  # the mistake under test


def test_eager_capture_records_module_calls_and_leaves_no_trace():
    from torch.nn.modules import module as module_mod

    model = Net()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [(name, id(p)) for name, p in model.named_parameters()]
    hooks = (len(module_mod._global_forward_pre_hooks), len(module_mod._global_forward_hooks))
    graph = capture(model, (torch.randn(2, 3, 4, 4),), method="eager")
    assert graph.method == "eager"
    ops = calls_by_op(graph)
    (conv,) = ops["conv2d"]
    assert (conv.weight_of, conv.shape) == ("block.conv", (2, 8, 4, 4))
    (bn,) = ops["batch_norm"]
    assert bn.weight_of == "block.bn" and bn.inputs[0] == conv.name
    (relu,) = ops["relu"]
    assert relu.module == "block.act" and relu.inputs == (bn.name,)
    (linear,) = ops["linear"]
    assert (linear.weight_of, linear.shape) == ("head.2", (2, 5))
    assert [graph[n].kind for n in graph["output"].inputs] == ["call"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert [(name, id(p)) for name, p in model.named_parameters()] == params
    assert model.training and model.block.bn.training
    assert (len(module_mod._global_forward_pre_hooks), len(module_mod._global_forward_hooks)) == hooks
    assert not torch.overrides._get_current_function_mode_stack()


def test_eager_capture_follows_the_branch_the_inputs_take():
    model = DataDependent()
    taken = capture(model, (torch.ones(2, 4),), method="eager")
    assert [n.weight_of for n in taken.calls() if n.op == "linear"] == ["fc"]
    skipped = capture(model, (-torch.ones(2, 4),), method="eager")
    assert [n for n in skipped.calls() if n.op == "linear"] == []


def test_unknown_capture_method():
    with pytest.raises(CompressError, match="unknown capture method 'fast'; use one of export, eager"):
        capture(Net(), (torch.randn(2, 3, 4, 4),), method="fast")
