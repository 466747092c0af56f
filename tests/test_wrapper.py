"""The wrapper contract of design.md: compression applied in forward, the model otherwise untouched.

Expected values are computed with ``torch.nn.functional`` on explicitly masked tensors, never by
running the wrapped model a second way.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import compress_core
from compress_core import unwrap
from compress_core.wrapper import get_wrapper

ADD = -1000.0  # the spec's value for apply_method 'add'


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, stride=2)
        self.fc = nn.Linear(4 * 3 * 3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def conv_net(seed: int = 0) -> ConvNet:
    torch.manual_seed(seed)
    return ConvNet()


def reference(model: ConvNet, x: torch.Tensor, masks: dict) -> torch.Tensor:
    """The masked forward, by hand."""
    conv, fc = model.conv, model.fc
    w1 = conv.weight.detach() * masks["conv"]["weight"]
    b1 = conv.bias.detach() * masks["conv"]["bias"]
    hidden = F.relu(F.conv2d(x, w1, b1, stride=2, padding=1)).flatten(1)
    return F.linear(
        hidden, fc.weight.detach() * masks["fc"]["weight"], fc.bias.detach() * masks["fc"]["bias"]
    )


PRUNE_ALL = [{"op_types": ["Conv2d", "Linear"], "sparse_ratio": 0.5}]


def hook_counts(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {
        name: (
            len(m._forward_pre_hooks),
            len(m._forward_hooks),
            len(m._forward_hooks_always_called),
            len(m._forward_pre_hooks_with_kwargs),
            len(m._forward_hooks_with_kwargs),
            len(m._load_state_dict_pre_hooks),
            len(m._state_dict_hooks),
            len(m._backward_hooks),
        )
        for name, m in model.named_modules()
    }


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for key, left in a.items():
        right = b[key]
        assert left.dtype == right.dtype and left.shape == right.shape, key
        # Compare bits, not values: -0.0 == 0.0 and NaN != NaN would hide differences.
        assert torch.equal(left.view(torch.uint8), right.view(torch.uint8)), key


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_clean(model: nn.Module) -> None:
    """No wrapper, hook or compression state left anywhere."""
    for name, module in model.named_modules():
        assert get_wrapper(module) is None, name
        assert "_compress_wrapper" not in module.__dict__, name
        assert not [b for b in module._buffers if "__" in b], name
        assert not [p for p in module._parameters if "__" in p], name
    assert all(counts == (0,) * 8 for counts in hook_counts(model).values())


# -- identity of parameters ------------------------------------------------------------------


def test_parameter_identity_and_names_unchanged():
    model = conv_net()
    before = [(name, id(p), p.data_ptr()) for name, p in model.named_parameters()]
    comp = compress_core.create("level", model, PRUNE_ALL)
    comp.compress()
    model(torch.randn(2, 2, 6, 6))
    after = [(name, id(p), p.data_ptr()) for name, p in model.named_parameters()]
    assert after == before
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())
    # Masks are buffers, not parameters: the optimizer does not see them.
    assert len(list(model.parameters())) == 4


def test_optimizer_built_before_create_trains_the_same_tensors():
    model = conv_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    params = dict(model.named_parameters())
    comp = compress_core.create("level", model, PRUNE_ALL)
    masks = {
        m: {t: v.clone() for t, v in targets.items()} for m, targets in comp.compress().items()
    }
    assert 0 < int((~masks["fc"]["weight"]).sum()) < masks["fc"]["weight"].numel()

    torch.manual_seed(1)
    x, y = torch.randn(8, 2, 6, 6), torch.randn(8, 5)
    for _ in range(3):
        start = {name: p.detach().clone() for name, p in params.items()}
        optimizer.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        for name, p in model.named_parameters():
            assert p is params[name]
            module, target = name.split(".")
            mask = masks[module][target].expand_as(p)
            assert p.grad is not None
            # Masked positions get no gradient; kept ones do.
            assert torch.all(p.grad[~mask] == 0)
            assert p.grad[mask].abs().sum() > 0
        optimizer.step()
        comp.step()
        for name, p in params.items():
            assert not torch.equal(p.detach(), start[name]), f"{name} was not updated in place"

    # The model still computes exactly the masked function of the trained weights.
    x_new = torch.randn(3, 2, 6, 6)
    torch.testing.assert_close(model(x_new), reference(model, x_new, masks))
    # Changing a masked weight changes nothing.
    with torch.no_grad():
        before = model(x_new)
        model.fc.weight[~masks["fc"]["weight"]] += 100.0
        torch.testing.assert_close(model(x_new), before, rtol=0, atol=0)


# -- forward ---------------------------------------------------------------------------------


def test_masked_forward_equals_functional_reference():
    model = conv_net()
    comp = compress_core.create("level", model, PRUNE_ALL)
    masks = comp.compress()
    assert set(masks) == {"conv", "fc"}
    for module_name, targets in masks.items():
        for target, mask in targets.items():
            assert mask.dtype == torch.bool
            assert mask.shape == getattr(model.get_submodule(module_name), target).shape
    assert int((~masks["conv"]["weight"]).sum()) == math.floor(4 * 2 * 3 * 3 * 0.5)
    x = torch.randn(3, 2, 6, 6)
    out = model(x)
    torch.testing.assert_close(out, reference(model, x, masks))
    # Gradients reach the inputs too.
    x.requires_grad_(True)
    model(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_forward_before_compress_is_the_original():
    model = conv_net()
    x = torch.randn(2, 2, 6, 6)
    expected = model(x)
    compress_core.create("level", model, PRUNE_ALL)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


class Scores(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 6)
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.softmax(self.fc(x))


def test_apply_method_add_on_softmax_input_via_align():
    torch.manual_seed(0)
    model = Scores()
    config = [
        {"op_names": ["fc"], "sparse_ratio": 0.5, "granularity": "out_channel"},
        {
            "op_names": ["softmax"],
            "target_names": ["_input_"],
            "target_settings": {
                "_input_": {
                    "align": {"module_name": "fc", "target_name": "weight", "dims": [0]},
                    "apply_method": "add",
                }
            },
        },
    ]
    comp = compress_core.create("level", model, config)
    masks = comp.compress()
    rows = masks["fc"]["weight"].all(dim=1)
    assert int((~rows).sum()) == 3
    assert torch.equal(masks["softmax"]["_input_0"].reshape(-1), rows)

    x = torch.randn(4, 3)
    logits = F.linear(x, model.fc.weight.detach() * rows[:, None], model.fc.bias.detach() * rows)
    expected = F.softmax(logits + torch.where(rows, 0.0, ADD), dim=-1)
    out = model(x)
    torch.testing.assert_close(out, expected)
    assert torch.all(out[:, ~rows] == 0)  # exp(-1000) underflows: masked scores vanish
    torch.testing.assert_close(out.sum(-1), torch.ones(4))


def test_apply_method_add_on_activation_via_level_after_running_data():
    model = nn.Sequential(nn.Softmax(dim=-1))
    compress = compress_core.create(
        "level",
        model,
        [
            {
                "op_types": ["Softmax"],
                "target_names": ["_input_"],
                "sparse_ratio": 0.5,
                "apply_method": "add",
            }
        ],
    )
    # Channel j has mean |x| = scale[j] exactly (entries are +-scale[j]).
    scale = torch.tensor([3.0, 0.5, 2.0, 0.25, 4.0, 1.0])
    signs = torch.tensor([[1.0], [-1.0], [1.0], [-1.0]])
    model(signs * scale)
    model((signs * scale)[:2])
    masks = compress.compress()
    keep = torch.tensor([True, False, True, False, True, False])  # 3 smallest of scale masked
    assert torch.equal(masks["0"]["_input_0"].reshape(-1), keep)

    x = torch.randn(5, 6)
    expected = F.softmax(x + torch.where(keep, 0.0, ADD), dim=-1)
    torch.testing.assert_close(model(x), expected)
    # Statistics are not part of the compressed model, and input masks cannot be baked:
    # unwrapping drops both and leaves the plain Softmax.
    assert not [k for k in model.state_dict() if "stat" in k]
    unwrap(model, bake=True)
    assert_clean(model)
    assert model.state_dict() == {}
    torch.testing.assert_close(model(x), F.softmax(x, dim=-1))


def test_apply_method_add_on_output():
    model = nn.Sequential(nn.Linear(4, 4, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.diag(torch.tensor([1.0, 4.0, 2.0, 3.0])))
    comp = compress_core.create(
        "level",
        model,
        [
            {
                "op_names": ["0"],
                "target_names": ["_output_"],
                "sparse_ratio": 0.5,
                "apply_method": "add",
            }
        ],
    )
    model(torch.ones(2, 4))
    comp.compress()
    x = torch.rand(3, 4)
    keep = torch.tensor([False, True, False, True])
    expected = F.linear(x, torch.diag(torch.tensor([1.0, 4.0, 2.0, 3.0]))) + torch.where(
        keep, 0.0, ADD
    )
    torch.testing.assert_close(model(x), expected)


# -- unwrap ----------------------------------------------------------------------------------


def test_unwrap_without_bake_restores_the_original_bitwise():
    model = conv_net()
    user_hook_calls = []
    model.fc.register_forward_hook(lambda m, i, o: user_hook_calls.append(1))
    original_state = snapshot(model)
    original_keys = list(model.state_dict())
    params = [id(p) for p in model.parameters()]
    x = torch.randn(2, 2, 6, 6)
    expected = model(x)
    hooks_before = hook_counts(model)

    comp = compress_core.create("level", model, PRUNE_ALL)
    comp.compress()
    model(x)
    assert list(model.state_dict()) != original_keys  # masks are in the state_dict while wrapped

    assert unwrap(model, bake=False) is model
    assert_bitwise_equal(model.state_dict(), original_state)
    assert [id(p) for p in model.parameters()] == params
    assert hook_counts(model) == hooks_before  # the user's own hook survives, ours are gone
    for module in model.modules():
        assert get_wrapper(module) is None
        assert not [b for b in module._buffers if "__" in b]
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    assert len(user_hook_calls) == 3


def test_unwrap_with_bake_multiplies_masks_in_and_keeps_identity():
    model = conv_net()
    params = {name: (p, p.data_ptr()) for name, p in model.named_parameters()}
    originals = {name: p.detach().clone() for name, p in model.named_parameters()}
    comp = compress_core.create("level", model, PRUNE_ALL)
    masks = {
        m: {t: v.clone() for t, v in targets.items()} for m, targets in comp.compress().items()
    }
    x = torch.randn(2, 2, 6, 6)
    masked_out = model(x)

    unwrap(model, bake=True)
    assert_clean(model)
    for name, p in model.named_parameters():
        assert p is params[name][0] and p.data_ptr() == params[name][1]
        module, target = name.split(".")
        expected = originals[name] * masks[module][target]
        assert torch.equal(p.detach(), expected), name
    assert list(model.state_dict()) == list(originals)
    torch.testing.assert_close(model(x), masked_out)


def test_unwrap_with_bake_add_method():
    model = nn.Sequential(nn.Linear(3, 2, bias=False))
    original = model[0].weight.detach().clone()
    comp = compress_core.create(
        "level",
        model,
        [
            {
                "op_names": ["0"],
                "target_names": ["weight"],
                "sparse_ratio": 0.5,
                "apply_method": "add",
            }
        ],
    )
    mask = comp.compress()["0"]["weight"].clone()
    unwrap(model, bake=True)
    assert torch.equal(model[0].weight.detach(), torch.where(mask, original, original + ADD))


def test_unwrap_of_an_unwrapped_model_is_a_no_op():
    model = conv_net()
    state = snapshot(model)
    unwrap(model)
    unwrap(model, bake=True)
    assert_bitwise_equal(model.state_dict(), state)


# -- deepcopy --------------------------------------------------------------------------------


def test_deepcopy_of_a_wrapped_model_is_independent():
    model = conv_net()
    comp = compress_core.create("level", model, PRUNE_ALL)
    masks = {
        m: {t: v.clone() for t, v in targets.items()} for m, targets in comp.compress().items()
    }
    original_state = snapshot(model)
    clone = copy.deepcopy(model)
    assert get_wrapper(clone.fc) is not None and get_wrapper(clone.fc) is not get_wrapper(model.fc)
    assert all(a is not b for a, b in zip(clone.parameters(), model.parameters()))
    x = torch.randn(2, 2, 6, 6)
    torch.testing.assert_close(clone(x), reference(model, x, masks), rtol=0, atol=0)
    # The copy's load_state_dict hook is its own: loading a state into it leaves the original alone.
    other = conv_net(3)
    compress_core.create("level", other, PRUNE_ALL).compress()
    clone.load_state_dict(other.state_dict())
    torch.testing.assert_close(clone(x), other(x), rtol=0, atol=0)
    assert_bitwise_equal(model.state_dict(), original_state)

    # Unwrapping the copy leaves the original wrapped and masked.
    unwrap(clone)
    assert_clean(clone)
    assert get_wrapper(model.fc) is not None and get_wrapper(model.conv) is not None
    torch.testing.assert_close(model(x), reference(model, x, masks))
    assert_bitwise_equal(model.state_dict(), original_state)
    unmasked = {
        m: {t: torch.ones_like(v) for t, v in targets.items()} for m, targets in masks.items()
    }
    torch.testing.assert_close(clone(x), reference(clone, x, unmasked))


def test_unwrapping_the_original_leaves_the_copy_wrapped():
    model = conv_net()
    comp = compress_core.create("level", model, PRUNE_ALL)
    masks = {
        m: {t: v.clone() for t, v in targets.items()} for m, targets in comp.compress().items()
    }
    clone = copy.deepcopy(model)
    clone_state = snapshot(clone)
    unwrap(model, bake=True)
    assert_clean(model)
    assert_bitwise_equal(clone.state_dict(), clone_state)
    x = torch.randn(2, 2, 6, 6)
    torch.testing.assert_close(clone(x), reference(clone, x, masks))
    # Changing the copy's mask does not reach the original's (now baked) weights, and back.
    clone.fc.weight__pruning_mask.fill_(True)
    torch.testing.assert_close(
        clone(x),
        reference(
            clone,
            x,
            {
                **masks,
                "fc": {
                    "weight": torch.ones_like(masks["fc"]["weight"]),
                    "bias": masks["fc"]["bias"],
                },
            },
        ),
    )
    unwrap(clone, bake=False)
    assert_clean(clone)


def test_deepcopy_before_compress_then_compress_original():
    model = conv_net()
    comp = compress_core.create("level", model, PRUNE_ALL)
    clone = copy.deepcopy(model)
    comp.compress()  # the compressor belongs to the original
    x = torch.randn(2, 2, 6, 6)
    ones = {
        m: {"weight": torch.ones(1, dtype=torch.bool), "bias": torch.ones(1, dtype=torch.bool)}
        for m in ("conv", "fc")
    }
    torch.testing.assert_close(clone(x), reference(clone, x, ones))


# -- state_dict ------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["element", "out_channel"])
def test_state_dict_round_trip_into_a_freshly_wrapped_model(granularity):
    config = [{"op_types": ["Conv2d", "Linear"], "sparse_ratio": 0.5, "granularity": granularity}]
    source = conv_net(0)
    masks = compress_core.create("level", source, config).compress()
    state = source.state_dict()
    assert {"conv.weight__pruning_mask", "fc.bias__pruning_mask"} <= set(state)

    target = conv_net(1)  # other weights, placeholder masks
    compress_core.create("level", target, config)
    target.load_state_dict(state)
    for name, mask in (("conv.weight", masks["conv"]["weight"]), ("fc.bias", masks["fc"]["bias"])):
        loaded = target.state_dict()[f"{name}__pruning_mask"]
        assert torch.equal(loaded.expand_as(mask), mask)
    x = torch.randn(2, 2, 6, 6)
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)
    torch.testing.assert_close(target(x), reference(target, x, masks))
    unwrap(target, bake=True)
    assert_clean(target)
    torch.testing.assert_close(target(x), source(x))


def test_torch_save_and_load_weights_only(tmp_path):
    source = conv_net(0)
    masks = compress_core.create("level", source, PRUNE_ALL).compress()
    path = tmp_path / "pruned.pt"
    torch.save(source.state_dict(), path)
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)

    for loaded_state in (
        torch.load(path, weights_only=True),
        torch.load(buffer, weights_only=True),
    ):
        target = conv_net(2)
        compress_core.create("level", target, PRUNE_ALL)
        target.load_state_dict(loaded_state)
        assert loaded_state["fc.weight__pruning_mask"].dtype == torch.bool
        x = torch.randn(2, 2, 6, 6)
        torch.testing.assert_close(target(x), reference(source, x, masks), rtol=0, atol=0)


def test_state_dict_with_masks_does_not_load_into_an_unwrapped_model():
    source = conv_net(0)
    compress_core.create("level", source, PRUNE_ALL).compress()
    with pytest.raises(RuntimeError, match="pruning_mask"):
        conv_net(1).load_state_dict(source.state_dict())


# -- robustness ------------------------------------------------------------------------------


class Flaky(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4))
        self.fail = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight.t()
        if self.fail:
            raise ValueError("boom inside forward")
        return y


def test_exception_inside_forward_restores_parameters():
    torch.manual_seed(0)
    holder = nn.Sequential(Flaky())
    flaky = holder[0]
    weight = flaky.weight
    comp = compress_core.create(
        "level", holder, [{"op_types": ["Flaky"], "target_names": ["weight"], "sparse_ratio": 0.5}]
    )
    mask = comp.compress()["0"]["weight"].clone()
    flaky.fail = True
    for _ in range(2):
        with pytest.raises(ValueError, match="boom"):
            holder(torch.randn(2, 4))
        assert flaky._parameters["weight"] is weight
        assert isinstance(flaky.weight, nn.Parameter)
        assert [p for p in holder.parameters()] == [weight]
    flaky.fail = False
    x = torch.randn(2, 4)
    torch.testing.assert_close(holder(x), x @ (weight.detach() * mask).t())
    assert flaky._parameters["weight"] is weight
    unwrap(holder)
    assert_clean(holder)


class Recursive(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([1.0, 2.0, 3.0, 4.0]))

    def forward(self, x: torch.Tensor, depth: int = 1) -> torch.Tensor:
        y = x * self.weight
        return y if depth == 0 else self(y, depth=depth - 1)


def test_recursive_module_is_compressed_once_per_outermost_call():
    model = nn.Sequential()
    model.add_module("rec", Recursive())
    comp = compress_core.create(
        "level",
        model,
        [
            {
                "op_types": ["Recursive"],
                "target_names": ["weight"],
                "sparse_ratio": 0.25,
                "apply_method": "add",
            }
        ],
    )
    assert torch.equal(comp.compress()["rec"]["weight"], torch.tensor([False, True, True, True]))
    masked = torch.tensor([1.0 + ADD, 2.0, 3.0, 4.0])
    torch.testing.assert_close(model(torch.ones(4)), masked * masked)
    assert model.rec._parameters["weight"] is model.rec.weight and isinstance(
        model.rec.weight, nn.Parameter
    )
    torch.testing.assert_close(model(torch.ones(4)), masked * masked)  # the stack unwound


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = self.a  # the same module under a second name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize(
    "config",
    [
        [{"op_types": ["Linear"], "sparse_ratio": 0.5, "apply_method": "add"}],
        [{"op_names": ["a", "b"], "sparse_ratio": 0.5, "apply_method": "add"}],
        [{"op_names": ["b"], "sparse_ratio": 0.5, "apply_method": "add"}],
    ],
)
def test_shared_module_is_wrapped_once(config):
    torch.manual_seed(0)
    model = Shared()
    comp = compress_core.create("level", model, config)
    masks = comp.compress()
    assert list(masks) == ["a"]  # one target, under the module's first name
    assert len(model.a._forward_pre_hooks) == 1 and len(model.a._forward_hooks) == 1
    assert len([b for b in model.a._buffers if b.endswith("__pruning_mask")]) == 2
    # 'add' would subtract 2000 if the mask were applied twice per call.
    w = model.a.weight.detach()
    w = torch.where(masks["a"]["weight"], w, w + ADD)
    bias = model.a.bias.detach()
    bias = torch.where(masks["a"]["bias"], bias, bias + ADD)
    x = torch.randn(3, 4)
    torch.testing.assert_close(model(x), F.linear(F.relu(F.linear(x, w, bias)), w, bias))
    unwrap(model)
    assert_clean(model)


# -- inputs and outputs ----------------------------------------------------------------------


class Gate(nn.Module):
    def forward(
        self, x: torch.Tensor, y: torch.Tensor, *, scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        out = x * y
        return out if scale is None else out * scale


class GateNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = Gate()

    def forward(self, x, y, scale=None, positional=False):
        if positional:
            return self.gate(x, y, scale=scale)
        return self.gate(x, y=y, scale=scale)


SCALE = torch.tensor([3.0, 0.5, 2.0, 0.25])  # mean |.| per channel
KEEP = torch.tensor([True, False, True, False])


@pytest.mark.parametrize("target", ["_input_y", "_input_1"])
def test_input_target_passed_by_keyword(target):
    model = GateNet()
    comp = compress_core.create(
        "level", model, [{"op_names": ["gate"], "target_names": [target], "sparse_ratio": 0.5}]
    )
    model(torch.ones(2, 4), y=torch.stack([SCALE, -SCALE]))  # observed through the keyword
    masks = comp.compress()
    assert list(masks["gate"]) == ["_input_1"]  # _input_y and _input_1 are one target
    assert torch.equal(masks["gate"]["_input_1"].reshape(-1), KEEP)

    x, y = torch.randn(3, 4), torch.randn(3, 4)
    expected = x * (y * KEEP)
    torch.testing.assert_close(model(x, y), expected)  # GateNet passes y=... by keyword
    torch.testing.assert_close(model(x, y, positional=True), expected)


def test_keyword_only_input_target():
    model = GateNet()
    comp = compress_core.create(
        "level",
        model,
        [{"op_names": ["gate"], "target_names": ["_input_scale"], "sparse_ratio": 0.5}],
    )
    ones = torch.ones(2, 4)
    model(ones, ones, scale=torch.stack([-SCALE, SCALE]))
    masks = comp.compress()
    assert torch.equal(masks["gate"]["_input_scale"].reshape(-1), KEEP)
    x, y, s = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(model(x, y, scale=s), x * y * (s * KEEP))
    # An optional input that is not passed is left alone.
    torch.testing.assert_close(model(x, y), x * y)


class TupleHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4, bias=False)
        self.b = nn.Linear(4, 4, bias=False)

    def forward(self, x):
        return self.a(x), self.b(x)


class DictHeads(TupleHeads):
    def forward(self, x):
        return {"logits": self.a(x), "hidden": self.b(x)}


def heads(cls: type) -> nn.Module:
    model = nn.Sequential()
    model.add_module("heads", cls())
    with torch.no_grad():
        model.heads.a.weight.copy_(torch.eye(4) * 5)
        model.heads.b.weight.copy_(torch.diag(torch.tensor([1.0, 4.0, 2.0, 3.0])))
    return model


HEAD_KEEP = torch.tensor([False, True, False, True])  # |diag| 1 and 2 are the smallest


@pytest.mark.parametrize(
    ("cls", "target", "canonical"),
    [
        (TupleHeads, "_output_1", "_output_1"),
        (DictHeads, "_output_hidden", "_output_hidden"),
        (DictHeads, "_output_1", "_output_1"),
    ],
)
def test_output_targets_of_tuple_and_dict_outputs(cls, target, canonical):
    model = heads(cls)
    comp = compress_core.create(
        "level", model, [{"op_names": ["heads"], "target_names": [target], "sparse_ratio": 0.5}]
    )
    model(torch.ones(3, 4))
    masks = comp.compress()
    assert torch.equal(masks["heads"][canonical].reshape(-1), HEAD_KEEP)

    x = torch.randn(2, 4)
    first = F.linear(x, torch.eye(4) * 5)
    second = F.linear(x, torch.diag(torch.tensor([1.0, 4.0, 2.0, 3.0]))) * HEAD_KEEP
    out = model(x)
    if cls is TupleHeads:
        assert isinstance(out, tuple) and len(out) == 2
        torch.testing.assert_close(out[0], first)
        torch.testing.assert_close(out[1], second)
    else:
        assert list(out) == ["logits", "hidden"]
        torch.testing.assert_close(out["logits"], first)
        torch.testing.assert_close(out["hidden"], second)
    unwrap(model)
    assert_clean(model)


def test_first_output_of_a_tuple():
    model = heads(TupleHeads)
    comp = compress_core.create(
        "level",
        model,
        [{"op_names": ["heads"], "target_names": ["_output_"], "sparse_ratio": 0.25}],
    )
    model(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    masks = comp.compress()
    keep = torch.tensor([False, True, True, True])  # 5*|x_j|: channel 0 smallest
    assert torch.equal(masks["heads"]["_output_"].reshape(-1), keep)
    x = torch.randn(2, 4)
    out = model(x)
    torch.testing.assert_close(out[0], F.linear(x, torch.eye(4) * 5) * keep)
    torch.testing.assert_close(out[1], F.linear(x, torch.diag(torch.tensor([1.0, 4.0, 2.0, 3.0]))))


def test_output_and_output_0_are_one_target():
    model = heads(TupleHeads)
    config = [
        {
            "op_names": ["heads"],
            "target_names": ["_output_"],
            "sparse_ratio": 0.25,
            "apply_method": "add",
        },
        {
            "op_names": ["heads"],
            "target_names": ["_output_0"],
            "sparse_ratio": 0.25,
            "apply_method": "add",
        },
    ]
    with pytest.warns(compress_core.ConfigWarning, match="config_list\\[0\\]"):
        comp = compress_core.create("level", model, config)
    model(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    comp.compress()
    x = torch.randn(2, 4)
    keep = torch.tensor([False, True, True, True])
    torch.testing.assert_close(
        model(x)[0], F.linear(x, torch.eye(4) * 5) + torch.where(keep, 0.0, ADD)
    )
