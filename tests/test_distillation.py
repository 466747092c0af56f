"""The distillation plugin: every distillation key, both methods, the teacher run, the errors.

Expected losses are computed independently: in float64 by hand (``((s - t) ** 2).mean()``, the
KL divergence written out from its definition) on values taken from the plain, unwrapped
modules.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
from torch import nn

import compress_core
from compress_core import CompressError, ConfigError, unwrap
from compress_core.wrapper import wrappers


def mse64(s: torch.Tensor, t: torch.Tensor) -> float:
    return float(((s.detach().double() - t.detach().double()) ** 2).mean())


def kl64(s: torch.Tensor, t: torch.Tensor) -> float:
    """The spec's KL: batchmean of sum p_t (log p_t - log p_s) at temperature 2, times 4."""
    s, t = s.detach().double() / 2, t.detach().double() / 2
    log_ps = s - s.exp().sum(-1, keepdim=True).log()
    log_pt = t - t.exp().sum(-1, keepdim=True).log()
    return float((log_pt.exp() * (log_pt - log_ps)).sum() / s.shape[0] * 4)


class Mlp(nn.Module):
    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Pair(nn.Module):
    """Two inputs, a tuple output and a dict-returning child."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.heads = Heads()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.heads(self.a(x))
        return out["logits"], self.b(y) + out["hidden"]


class Heads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(4, 4)
        self.logits = nn.Linear(4, 5)

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"hidden": self.hidden(h), "logits": self.logits(h)}


def perturbed(model: nn.Module, seed: int = 1) -> nn.Module:
    student = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return student


@pytest.fixture
def pair():
    torch.manual_seed(0)
    teacher = Mlp()
    return teacher, perturbed(teacher)


def untouched(model: nn.Module) -> bool:
    return not list(wrappers(model)) and all(
        not m._forward_pre_hooks and not m._forward_hooks for m in model.modules()
    )


# -- registration -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, canonical",
    [
        ("dynamic_layerwise", "dynamic_layerwise"),
        ("DynamicLayerwiseDistiller", "dynamic_layerwise"),
        ("adaptive1d_layerwise", "adaptive1d_layerwise"),
        ("Adaptive1dLayerwiseDistiller", "adaptive1d_layerwise"),
    ],
)
def test_methods_and_aliases_are_registered(name, canonical):
    info = compress_core.get_host().method(name)
    assert info.name == canonical and info.kind == "distillation" and info.plugin == "distillation"


# -- the losses ------------------------------------------------------------------------------


def test_default_target_link_and_mse_summed_with_lambda(pair):
    teacher, student = pair
    reference = copy.deepcopy(student)
    comp = compress_core.create(
        "dynamic_layerwise",
        student,
        [{"op_names": ["fc1"], "lambda": 3}, {"op_names": ["fc2"], "lambda": 0.5}],
        teacher=teacher,
    )
    x = torch.randn(6, 4)
    student(x)
    expected = 3 * mse64(reference.fc1(x), teacher.fc1(x)) + 0.5 * mse64(reference(x), teacher(x))
    assert comp.loss().item() == pytest.approx(expected, rel=1e-5)
    terms = comp.compress()
    assert set(terms) == {"fc1", "fc2"} and set(terms["fc1"]) == {"_output_"}
    assert float(terms["fc1"]["_output_"]) == pytest.approx(3 * mse64(reference.fc1(x), teacher.fc1(x)), rel=1e-5)


def test_kl_is_the_spec_formula(pair):
    teacher, student = pair
    reference = copy.deepcopy(student)
    comp = compress_core.create(
        "dynamic_layerwise", student, [{"op_names": ["fc2"], "apply_method": "kl", "lambda": 2}], teacher=teacher
    )
    x = torch.randn(7, 4)
    student(x)
    assert comp.loss().item() == pytest.approx(2 * kl64(reference(x), teacher(x)), rel=1e-5)


def test_several_links_the_smallest_counts(pair):
    teacher, student = pair
    teacher.fc_b = nn.Linear(4, 8)  # a second teacher module with fc1's output shape
    teacher.forward = lambda x: (teacher.fc_b(x), Mlp.forward(teacher, x))[1]  # type: ignore[method-assign]
    reference = copy.deepcopy(student)
    comp = compress_core.create(
        "dynamic_layerwise", student, [{"op_names": ["fc1"], "link": ["fc1", "fc_b"]}], teacher=teacher
    )
    x = torch.randn(5, 4)
    student(x)
    per_link = [mse64(reference.fc1(x), teacher.fc1(x)), mse64(reference.fc1(x), teacher.fc_b(x))]
    assert per_link[0] != pytest.approx(per_link[1])
    assert comp.loss().item() == pytest.approx(min(per_link), rel=1e-5)


def test_input_output_index_and_key_targets():
    torch.manual_seed(0)
    teacher = Pair()
    student = perturbed(teacher)
    reference = copy.deepcopy(student)
    config = [
        {"op_names": [""], "target_names": ["_input_1", "_output_1"]},
        {"op_names": ["heads"], "target_names": ["_output_logits"], "apply_method": "kl"},
        {"op_names": ["heads"], "target_names": ["_output_hidden"], "lambda": 0.25},
        {"op_names": ["b"], "link": "a", "lambda": 4},
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        comp = compress_core.create("dynamic_layerwise", student, config, teacher=teacher)
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    student(x, y=y)
    _, s_second = reference(x, y)
    _, t_second = teacher(x, y)
    s_heads, t_heads = reference.heads(reference.a(x)), teacher.heads(teacher.a(x))
    expected = (
        mse64(y, y)  # the same input reaches both models
        + mse64(s_second, t_second)
        + kl64(s_heads["logits"], t_heads["logits"])
        + 0.25 * mse64(s_heads["hidden"], t_heads["hidden"])
        + 4 * mse64(reference.b(y), teacher.a(x))
    )
    assert comp.loss().item() == pytest.approx(expected, rel=1e-5)
    terms = comp.compress()
    assert set(terms[""]) == {"_input_1", "_output_1"}
    assert float(terms[""]["_input_1"]) == 0.0


def test_a_link_without_the_target_is_reported():
    torch.manual_seed(0)
    teacher = Pair()
    student = perturbed(teacher)
    config = [{"op_names": ["heads"], "target_names": ["_output_hidden"], "link": "a"}]
    comp = compress_core.create("dynamic_layerwise", student, config, teacher=teacher)
    student(torch.randn(2, 4), torch.randn(2, 4))
    with pytest.raises(CompressError, match="teacher module 'a' produced no tensor '_output_hidden'"):
        comp.loss()
    unwrap(student)
    # Given example_inputs, the same mistake is a config error at create.
    example = (torch.randn(2, 4), torch.randn(2, 4))
    with pytest.raises(ConfigError, match="'a' produced no tensor '_output_hidden'") as info:
        compress_core.create("dynamic_layerwise", student, config, teacher=teacher, example_inputs=example)
    assert (info.value.entry, info.value.key, info.value.module) == (0, "link", "heads")
    assert untouched(student)


def test_loss_backpropagates_into_the_student_only(pair):
    teacher, student = pair
    teacher.train()
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    comp = compress_core.create("dynamic_layerwise", student, [{"op_types": ["Linear"]}], teacher=teacher)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    x = torch.randn(16, 4)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        student(x)
        loss = comp.loss()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, state[k]) for k, v in teacher.state_dict().items())
    assert teacher.training and all(m.training for m in teacher.modules())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in teacher.modules())


def test_teacher_runs_in_eval_mode_on_the_students_inputs():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.BatchNorm1d(4))
    student = perturbed(teacher)
    teacher.train()
    running = teacher[2].running_mean.clone()
    comp = compress_core.create("dynamic_layerwise", student, [{"op_names": ["2"]}], teacher=teacher)
    x = torch.randn(8, 4)
    out = student(x)  # the student itself trains: dropout and batch statistics
    teacher.eval()
    expected = mse64(out, teacher(x))
    teacher.train()
    assert comp.loss().item() == pytest.approx(expected, rel=1e-5)
    assert torch.equal(teacher[2].running_mean, running) and teacher.training


def test_teacher_runs_lazily_once_per_student_forward(pair):
    teacher, student = pair
    calls: list[tuple[Any, ...]] = []

    def predict(model: nn.Module, x: torch.Tensor) -> None:
        calls.append((torch.is_grad_enabled(), model.training))
        model(x * 2)

    reference = copy.deepcopy(student)
    comp = compress_core.create(
        "dynamic_layerwise", student, [{"op_names": ["fc2"]}], teacher=teacher, teacher_predict=predict
    )
    x = torch.randn(4, 4)
    student(x)
    student(x + 1)  # the last forward counts
    assert calls == []
    first = comp.loss()
    second = comp.loss()
    assert calls == [(False, False)]
    expected = mse64(reference(x + 1), teacher((x + 1) * 2))
    assert first.item() == second.item() == pytest.approx(expected, rel=1e-5)
    student(x)
    comp.loss()
    assert len(calls) == 2


def test_total_loss_weights_the_task_loss(pair):
    teacher, student = pair
    comp = compress_core.create(
        "dynamic_layerwise", student, [{"op_names": ["fc2"]}], teacher=teacher, origin_loss_lambda=0.3
    )
    x = torch.randn(4, 4)
    task = student(x).pow(2).mean()
    assert comp.total_loss(task).item() == pytest.approx(0.3 * task.item() + comp.loss().item(), rel=1e-6)


def test_loss_before_any_forward_is_an_error(pair):
    teacher, student = pair
    comp = compress_core.create("dynamic_layerwise", student, [{"op_names": ["fc2"]}], teacher=teacher)
    with pytest.raises(CompressError, match="has not run"):
        comp.loss()
    assert comp.compress() == {}


def test_unwrap_and_close_remove_every_hook(pair):
    teacher, student = pair
    comp = compress_core.create("dynamic_layerwise", student, [{"op_names": ["fc2"]}], teacher=teacher)
    assert student._forward_pre_hooks  # the root hook that captures the inputs
    unwrap(student)
    student(torch.randn(2, 4))  # the root hook notices it is detached and removes itself
    assert untouched(student)

    comp = compress_core.create("dynamic_layerwise", student, [{"op_names": ["fc2"]}], teacher=teacher)
    comp.close()
    unwrap(student)
    assert untouched(student)


def test_shared_module_records_the_students_call_only():
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    teacher = nn.Sequential(shared, nn.Linear(4, 2))
    student = nn.Sequential(shared, nn.Linear(4, 2))
    comp = compress_core.create(
        "dynamic_layerwise", student, [{"op_names": ["0"], "target_names": ["_input_"]}], teacher=teacher,
        teacher_predict=lambda t, x: t(x + 1),
    )
    x = torch.randn(3, 4)
    student(x)
    assert comp.loss().item() == pytest.approx(mse64(x, x + 1), rel=1e-5)


# -- adaptive1d_layerwise ---------------------------------------------------------------------


def test_adapter_where_widths_differ_and_its_loss():
    torch.manual_seed(0)
    teacher, student = Mlp(hidden=8), Mlp(hidden=5)
    x = torch.randn(6, 4)
    comp = compress_core.create(
        "adaptive1d_layerwise",
        student,
        [{"op_names": ["fc1", "fc2"]}],
        teacher=teacher,
        example_inputs=(x,),
    )
    assert list(comp.adapters) == ["fc1/_output_"]  # fc2 outputs 3 in both: no adapter
    adapter = comp.adapters["fc1/_output_"]
    assert (adapter.in_features, adapter.out_features) == (5, 8)
    params = list(comp.parameters())
    assert [p.shape for p in params] == [torch.Size([8, 5]), torch.Size([8])]
    assert not {id(p) for p in params} & {id(p) for p in student.parameters()}
    assert not any("adapter" in k for k in student.state_dict())

    student(x)
    with torch.no_grad():
        mapped = student.fc1(x) @ adapter.weight.T + adapter.bias
        expected = mse64(mapped, teacher.fc1(x)) + mse64(student(x), teacher(x))
    assert comp.loss().item() == pytest.approx(expected, rel=1e-5)


def test_adapters_train_and_are_saved_with_the_compressor_state():
    torch.manual_seed(0)
    teacher, student = Mlp(hidden=8), Mlp(hidden=5)
    x = torch.randn(32, 4)
    comp = compress_core.create(
        "adaptive1d_layerwise", student, [{"op_names": ["fc1"]}], teacher=teacher, example_inputs=(x[:2],)
    )
    optimizer = torch.optim.Adam([*student.parameters(), *comp.parameters()], lr=0.05)
    first = None
    for _ in range(30):
        optimizer.zero_grad()
        student(x)
        loss = comp.loss()
        loss.backward()
        optimizer.step()
        first = loss.item() if first is None else first
    student(x)
    trained = comp.loss().item()
    assert trained < 0.3 * first

    saved = copy.deepcopy(comp.state_dict())
    assert set(saved) == {"fc1/_output_.weight", "fc1/_output_.bias"}
    fresh_student = copy.deepcopy(student)
    unwrap(fresh_student)
    fresh = compress_core.create(
        "adaptive1d_layerwise", fresh_student, [{"op_names": ["fc1"]}], teacher=teacher, example_inputs=(x[:2],)
    )
    fresh_student(x)
    assert fresh.loss().item() != pytest.approx(trained)
    fresh.load_state_dict(saved)
    fresh_student(x)
    assert fresh.loss().item() == pytest.approx(trained, rel=1e-6)


# -- errors before the model is touched ---------------------------------------------------------


def _teacher_with_args() -> nn.Module:
    return Pair()


@pytest.mark.parametrize(
    "method, config, params, key, entry, module, match",
    [
        ("dynamic_layerwise", [{"op_names": ["fc1"], "link": "fc9"}], {}, "link", 0, "fc1", "no module 'fc9'"),
        (
            "dynamic_layerwise",
            [{"op_names": ["fc2"]}, {"op_names": ["fc1"], "link": ["fc1", "fc3"]}],
            {},
            "link",
            1,
            "fc1",
            "closest: 'fc",
        ),
        ("dynamic_layerwise", [{"op_names": ["fc1"], "target_names": ["_input_y"]}], {}, "target_names", 0, "fc1", "no argument 'y'"),
        ("dynamic_layerwise", [{"op_names": ["fc1"], "lambda": "big"}], {}, "lambda", 0, "fc1", "number"),
        ("dynamic_layerwise", [{"op_names": ["fc1"], "apply_method": "l1"}], {}, "apply_method", 0, "fc1", "'mse', 'kl'"),
        ("dynamic_layerwise", [{"op_names": ["fc1"], "link": 3}], {}, "link", 0, "fc1", "module name"),
        ("dynamic_layerwise", [{"op_names": ["fc1"], "link": "fc2"}], {"example_inputs": (torch.randn(2, 4),)}, "link", 0, "fc1", "shape"),
        ("adaptive1d_layerwise", [{"op_names": ["fc1"], "link": ["fc1", "fc2"]}], {"example_inputs": (torch.randn(2, 4),)}, "link", 0, "fc1", "one link"),
        ("adaptive1d_layerwise", [{"op_names": ["fc1"]}], {}, "example_inputs", None, None, "needs example_inputs"),
        ("adaptive1d_layerwise", [{"op_names": ["fc1"]}], {"example_inputs": torch.randn(2, 4)}, "example_inputs", None, None, "tuple"),
        ("dynamic_layerwise", [{"op_names": ["fc1"]}], {"teacher": "model.pt"}, "teacher", None, None, "nn.Module"),
        ("dynamic_layerwise", [{"op_names": ["fc1"]}], {"teacher_predict": 3}, "teacher_predict", None, None, "callable"),
        ("dynamic_layerwise", [{"op_names": ["fc1"]}], {"temperature": 3}, "temperature", None, None, "no parameter"),
    ],
)
def test_config_errors_name_entry_key_module_and_leave_the_model_alone(
    pair, method, config, params, key, entry, module, match
):
    teacher, student = pair
    params = {"teacher": teacher, **params}
    state = copy.deepcopy(student.state_dict())
    with pytest.raises(ConfigError, match=match) as info:
        compress_core.create(method, student, config, **params)
    assert (info.value.key, info.value.entry, info.value.module) == (key, entry, module)
    assert untouched(student) and untouched(teacher)
    assert all(torch.equal(v, state[k]) for k, v in student.state_dict().items())


def test_adaptive_only_the_last_dimension_may_differ():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv1d(2, 4, 3))
    student = nn.Sequential(nn.Conv1d(2, 3, 3))
    with pytest.raises(ConfigError, match="only the last dimension") as info:
        compress_core.create(
            "adaptive1d_layerwise", student, [{"op_names": ["0"]}], teacher=teacher, example_inputs=(torch.randn(1, 2, 6),)
        )
    assert (info.value.entry, info.value.key, info.value.module) == (0, "link", "0")
    assert untouched(student)


def test_teacher_must_not_be_the_student(pair):
    _, student = pair
    with pytest.raises(ConfigError, match="separate model") as info:
        compress_core.create("dynamic_layerwise", student, [{"op_names": ["fc1"]}], teacher=student)
    assert info.value.key == "teacher" and untouched(student)
