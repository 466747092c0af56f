"""Compression targets: parameters, buffers, ``_input_*`` and ``_output_*`` (targets.py).

Inputs resolve against the forward signature (``self`` not counted); expected indices and
names below are read off the signatures by hand.
"""

from __future__ import annotations

from collections import OrderedDict, namedtuple

import pytest
import torch
import torch.nn as nn

from compress_core import ConfigError, ConfigWarning, canonicalize
from compress_core.targets import (
    TargetRef,
    get_input,
    get_output,
    map_output,
    resolve_target,
    set_input,
)


class TwoArgs(nn.Module):
    def forward(self, x, y, z=None):
        return x + y


class KwOnly(nn.Module):
    def forward(self, x, *, mask=None, scale=1.0):
        return x


class VarArgs(nn.Module):
    def forward(self, *args, **kwargs):
        return args[0]


class ArgsThenKwargs(nn.Module):
    def forward(self, x, *rest, key=None, **extra):
        return x


class PosOnly(nn.Module):
    def forward(self, x, /, y):
        return x + y


class WithState(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))
        self.register_parameter("unused", None)
        self.register_buffer("running", torch.zeros(3))
        self.register_buffer("empty", None)
        self.inner = nn.Linear(3, 3)

    def forward(self, x):
        return self.inner(x * self.scale)


class Container(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.two = TwoArgs()
        self.kw = KwOnly()
        self.var = VarArgs()
        self.mixed = ArgsThenKwargs()
        self.state = WithState()
        self.fc = nn.Linear(4, 3)
        self.nobias = nn.Linear(4, 3, bias=False)
        self.bn = nn.BatchNorm1d(3)


# -- parameters and buffers ----------------------------------------------------------------


def test_parameter_targets():
    lin = nn.Linear(4, 3)
    assert resolve_target(lin, "weight") == TargetRef(name="weight", kind="parameter")
    assert resolve_target(lin, "bias") == TargetRef(name="bias", kind="parameter")
    assert resolve_target(lin, "weight").is_tensor_attribute


def test_buffer_targets():
    bn = nn.BatchNorm1d(3)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        ref = resolve_target(bn, name)
        assert (ref.name, ref.kind) == (name, "buffer")
        assert ref.is_tensor_attribute
    assert resolve_target(bn, "weight").kind == "parameter"


def test_custom_parameters_and_buffers():
    mod = WithState()
    assert resolve_target(mod, "scale").kind == "parameter"
    assert resolve_target(mod, "running").kind == "buffer"


@pytest.mark.parametrize("name", ["unused", "empty"])
def test_none_parameter_or_buffer_is_not_a_target(name):
    with pytest.raises(ValueError, match=f"'{name}' is None"):
        resolve_target(WithState(), name)


def test_bias_false_has_no_bias_target():
    with pytest.raises(ValueError, match="'bias' is None"):
        resolve_target(nn.Linear(4, 3, bias=False), "bias")


def test_unknown_attribute_names_what_exists():
    with pytest.raises(ValueError) as info:
        resolve_target(nn.Linear(4, 3), "weights")
    text = str(info.value)
    assert "'weights'" in text
    assert "weight, bias" in text
    assert "_input_" in text and "_output_" in text


def test_submodule_attribute_is_not_a_target_with_a_hint():
    with pytest.raises(ValueError, match="submodule"):
        resolve_target(WithState(), "inner.weight")


def test_submodule_itself_is_not_a_target():
    with pytest.raises(ValueError):
        resolve_target(WithState(), "inner")


def test_non_tensor_attribute_is_not_a_target():
    with pytest.raises(ValueError):
        resolve_target(nn.Linear(4, 3), "in_features")


# -- inputs --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["_input_", "_input_0", "_input_input"])
def test_linear_input_spellings_are_one_target(name):
    # nn.Linear.forward(self, input)
    assert resolve_target(nn.Linear(2, 2), name) == TargetRef(name="_input_0", kind="input", index=0, key="input")


@pytest.mark.parametrize(
    ("name", "index", "key"),
    [
        ("_input_", 0, "x"),
        ("_input_0", 0, "x"),
        ("_input_x", 0, "x"),
        ("_input_1", 1, "y"),
        ("_input_y", 1, "y"),
        ("_input_2", 2, "z"),
        ("_input_z", 2, "z"),
    ],
)
def test_positional_inputs_by_index_or_name(name, index, key):
    ref = resolve_target(TwoArgs(), name)
    assert ref == TargetRef(name=f"_input_{index}", kind="input", index=index, key=key)
    assert not ref.is_tensor_attribute


def test_positional_index_past_the_signature_names_the_arguments():
    with pytest.raises(ValueError) as info:
        resolve_target(TwoArgs(), "_input_3")
    assert "x, y, z" in str(info.value)


def test_unknown_argument_name_names_the_arguments():
    with pytest.raises(ValueError) as info:
        resolve_target(TwoArgs(), "_input_w")
    assert "'w'" in str(info.value)
    assert "x, y, z" in str(info.value)


def test_self_is_not_counted():
    with pytest.raises(ValueError):
        resolve_target(TwoArgs(), "_input_self")


@pytest.mark.parametrize("name", ["mask", "scale"])
def test_keyword_only_inputs(name):
    assert resolve_target(KwOnly(), f"_input_{name}") == TargetRef(name=f"_input_{name}", kind="input", key=name)


def test_keyword_only_inputs_have_no_position():
    with pytest.raises(ValueError):
        resolve_target(KwOnly(), "_input_1")


@pytest.mark.parametrize("index", [0, 1, 5])
def test_var_positional_accepts_any_index(index):
    assert resolve_target(VarArgs(), f"_input_{index}") == TargetRef(name=f"_input_{index}", kind="input", index=index)


def test_var_keyword_accepts_any_name():
    assert resolve_target(VarArgs(), "_input_attention_mask") == TargetRef(
        name="_input_attention_mask", kind="input", key="attention_mask"
    )


def test_mixed_signature():
    mod = ArgsThenKwargs()
    assert resolve_target(mod, "_input_x") == TargetRef(name="_input_0", kind="input", index=0, key="x")
    assert resolve_target(mod, "_input_3") == TargetRef(name="_input_3", kind="input", index=3)
    assert resolve_target(mod, "_input_key") == TargetRef(name="_input_key", kind="input", key="key")
    assert resolve_target(mod, "_input_other") == TargetRef(name="_input_other", kind="input", key="other")


def test_positional_only_input_has_no_keyword():
    mod = PosOnly()
    assert resolve_target(mod, "_input_0") == TargetRef(name="_input_0", kind="input", index=0, key=None)
    assert resolve_target(mod, "_input_y") == TargetRef(name="_input_1", kind="input", index=1, key="y")


# -- get_input / set_input ----------------------------------------------------------------


def test_get_and_set_input_positional_and_keyword():
    ref_y = resolve_target(TwoArgs(), "_input_y")
    a, b = torch.ones(2), torch.zeros(2)
    assert get_input(ref_y, (a, b), {}) is b
    assert get_input(ref_y, (a,), {"y": b}) is b
    assert get_input(ref_y, (a,), {}) is None

    c = torch.full((2,), 7.0)
    args, kwargs = set_input(ref_y, (a, b), {}, c)
    assert args[0] is a and args[1] is c and kwargs == {}
    args, kwargs = set_input(ref_y, (a,), {"y": b}, c)
    assert args == (a,) and kwargs["y"] is c
    # Not passed at all: nothing is invented.
    args, kwargs = set_input(ref_y, (a,), {}, c)
    assert args == (a,) and kwargs == {}


def test_get_and_set_keyword_only_input():
    ref = resolve_target(KwOnly(), "_input_mask")
    x, m, new = torch.ones(1), torch.zeros(1), torch.full((1,), 3.0)
    assert get_input(ref, (x,), {"mask": m}) is m
    kwargs = {"mask": m}
    args, new_kwargs = set_input(ref, (x,), kwargs, new)
    assert new_kwargs["mask"] is new and kwargs["mask"] is m  # the caller's dict is not mutated
    assert len(args) == 1 and args[0] is x


# -- outputs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "index", "key"),
    [("_output_", None, None), ("_output_2", 2, None), ("_output_logits", None, "logits")],
)
def test_output_targets(name, index, key):
    assert resolve_target(nn.Linear(2, 2), name) == TargetRef(name=name, kind="output", index=index, key=key)


def test_output_0_is_the_same_target_as_output():
    # Both mean "the output tensor, or its first element", so they canonicalize to one name.
    assert resolve_target(nn.Linear(2, 2), "_output_0") == TargetRef(name="_output_", kind="output")


def double(t: torch.Tensor) -> torch.Tensor:
    return t * 2


def out_ref(name: str) -> TargetRef:
    return resolve_target(nn.Identity(), name)


def test_map_output_tensor():
    t = torch.arange(3.0)
    assert torch.equal(map_output(out_ref("_output_"), t, double), t * 2)
    assert torch.equal(map_output(out_ref("_output_0"), t, double), t * 2)
    assert map_output(out_ref("_output_1"), t, double) is t
    assert map_output(out_ref("_output_key"), t, double) is t


def test_map_output_tuple():
    a, b = torch.ones(2), torch.full((2,), 3.0)
    out = (a, b)
    first = map_output(out_ref("_output_"), out, double)
    assert type(first) is tuple
    assert torch.equal(first[0], a * 2) and first[1] is b
    second = map_output(out_ref("_output_1"), out, double)
    assert second[0] is a and torch.equal(second[1], b * 2)
    assert out[0] is a and out[1] is b  # the original tuple is left alone
    assert map_output(out_ref("_output_2"), out, double) is out
    assert map_output(out_ref("_output_name"), out, double) is out


def test_map_output_tuple_skips_non_tensor_elements():
    out = (torch.ones(1), None, 3)
    assert map_output(out_ref("_output_1"), out, double) is out
    assert map_output(out_ref("_output_2"), out, double) is out


def test_map_output_namedtuple_keeps_its_type():
    Pair = namedtuple("Pair", ["logits", "hidden"])
    out = Pair(torch.ones(2), torch.full((2,), 5.0))
    new = map_output(out_ref("_output_1"), out, double)
    assert type(new) is Pair
    assert new.logits is out.logits
    assert torch.equal(new.hidden, torch.full((2,), 10.0))
    new0 = map_output(out_ref("_output_"), out, double)
    assert type(new0) is Pair and torch.equal(new0.logits, torch.full((2,), 2.0))


def test_map_output_list():
    out = [torch.ones(2), torch.ones(2)]
    new = map_output(out_ref("_output_1"), out, double)
    assert type(new) is list
    assert new[0] is out[0]
    assert torch.equal(new[1], torch.full((2,), 2.0))


def test_map_output_dict_by_key_and_by_index():
    logits, hidden = torch.ones(2), torch.full((2,), 4.0)
    new = map_output(out_ref("_output_hidden"), {"logits": logits, "hidden": hidden}, double)
    assert new["logits"] is logits and torch.equal(new["hidden"], hidden * 2)
    new = map_output(out_ref("_output_1"), {"logits": logits, "hidden": hidden}, double)
    assert new["logits"] is logits and torch.equal(new["hidden"], hidden * 2)
    new = map_output(out_ref("_output_"), {"logits": logits, "hidden": hidden}, double)
    assert torch.equal(new["logits"], logits * 2) and new["hidden"] is hidden


def test_map_output_dict_missing_key_or_index_is_unchanged():
    out = {"logits": torch.ones(2)}
    again = map_output(out_ref("_output_loss"), out, double)
    assert again is out and torch.equal(out["logits"], torch.ones(2))
    assert map_output(out_ref("_output_3"), out, double) is out


def test_map_output_dict_non_tensor_value_is_unchanged():
    out = {"loss": None, "logits": torch.ones(2)}
    assert map_output(out_ref("_output_loss"), out, double)["loss"] is None


def test_map_output_mapping_subclass_keeps_its_type():
    class ModelOutputLike(OrderedDict):
        pass

    out = ModelOutputLike(logits=torch.ones(2), hidden=torch.ones(2))
    new = map_output(out_ref("_output_logits"), out, double)
    assert type(new) is ModelOutputLike
    assert torch.equal(new["logits"], torch.full((2,), 2.0))


def test_map_output_other_types_are_unchanged():
    assert map_output(out_ref("_output_"), None, double) is None
    assert map_output(out_ref("_output_"), "text", double) == "text"


def test_get_output():
    a, b = torch.ones(1), torch.zeros(1)
    assert get_output(out_ref("_output_"), a) is a
    assert get_output(out_ref("_output_1"), (a, b)) is b
    assert get_output(out_ref("_output_b"), {"a": a, "b": b}) is b
    assert get_output(out_ref("_output_c"), {"a": a}) is None
    assert get_output(out_ref("_output_1"), a) is None


def test_map_output_keeps_autograd():
    x = torch.ones(2, requires_grad=True)
    out = map_output(out_ref("_output_0"), (x * 3, x), double)
    out[0].sum().backward()
    assert torch.equal(x.grad, torch.full((2,), 6.0))


# -- targets through canonicalize ------------------------------------------------------------


def names_of(records):
    return [(r.module_name, r.target_name) for r in records]


def test_canonical_names_in_records():
    model = Container()
    config = [
        {"op_names": ["two"], "target_names": ["_input_y", "_output_"]},
        {"op_names": ["kw"], "target_names": ["_input_mask"]},
        {"op_names": ["var"], "target_names": ["_input_4", "_input_extra", "_output_hidden"]},
        {"op_names": ["state"], "target_names": ["scale", "running"]},
        {"op_names": ["fc"], "target_names": ["_input_input", "weight"]},
    ]
    records = canonicalize(model, config, "distillation")
    assert names_of(records) == [
        ("two", "_input_1"),
        ("two", "_output_"),
        ("kw", "_input_mask"),
        ("var", "_input_4"),
        ("var", "_input_extra"),
        ("var", "_output_hidden"),
        ("state", "scale"),
        ("state", "running"),
        ("fc", "_input_0"),
        ("fc", "weight"),
    ]
    kinds = {(r.module_name, r.target_name): r.target.kind for r in records}
    assert kinds[("state", "running")] == "buffer"
    assert kinds[("state", "scale")] == "parameter"
    assert kinds[("var", "_output_hidden")] == "output"


def test_input_name_and_index_in_one_entry_are_one_record():
    model = Container()
    records = canonicalize(model, [{"op_names": ["two"], "target_names": ["_input_x", "_input_0", "_input_"]}], "distillation")
    assert names_of(records) == [("two", "_input_0")]


def test_input_name_and_index_in_two_entries_are_configured_once():
    model = Container()
    config = [
        {"op_names": ["two"], "target_names": ["_input_x"], "lambda": 2.0},
        {"op_names": ["two"], "target_names": ["_input_0"], "lambda": 5.0},
    ]
    with pytest.warns(ConfigWarning, match=r"config_list\[1\].*two\._input_0.*config_list\[0\]"):
        records = canonicalize(model, config, "distillation")
    assert [(r.target_name, r.entry, r.settings.lambda_) for r in records] == [("_input_0", 0, 2.0)]


def test_target_settings_under_another_spelling_apply_to_the_same_target():
    model = Container()
    records = canonicalize(
        model,
        [{"op_names": ["two"], "target_names": ["_input_0"], "target_settings": {"_input_x": {"lambda": 3.0}}}],
        "distillation",
    )
    assert [(r.target_name, r.settings.lambda_) for r in records] == [("_input_0", 3.0)]


def test_two_spellings_both_configured_is_an_error():
    model = Container()
    with pytest.raises(ConfigError) as info:
        canonicalize(
            model,
            [{"op_names": ["two"],
              "target_settings": {"_input_x": {"lambda": 3.0}, "_input_0": {"lambda": 4.0}}}],
            "distillation",
        )
    assert info.value.entry == 0 and info.value.module == "two"
    assert info.value.key.startswith("target_settings._input_")


@pytest.mark.parametrize(
    ("module", "target", "mentions"),
    [
        ("fc", "weights", ["weight, bias"]),
        ("fc", "_input_1", ["input"]),
        ("fc", "_input_x", ["input"]),
        ("two", "_input_5", ["x, y, z"]),
        ("kw", "_input_foo", ["x, mask, scale"]),
        ("state", "empty", ["None"]),
        ("nobias", "bias", ["None"]),
        ("state", "inner.weight", ["submodule"]),
    ],
)
def test_nonexistent_target_is_a_config_error_naming_what_exists(module, target, mentions):
    model = Container()
    with pytest.raises(ConfigError) as info:
        canonicalize(model, [{"op_names": [module], "target_names": [target]}], "distillation")
    err = info.value
    assert (err.entry, err.key, err.module) == (0, "target_names", module)
    for text in mentions:
        assert text in str(err)


def test_nonexistent_target_in_target_settings_names_that_key():
    model = Container()
    with pytest.raises(ConfigError) as info:
        canonicalize(model, [{"op_names": ["fc"], "target_settings": {"bogus": {"lambda": 1.0}}}], "distillation")
    assert (info.value.key, info.value.module) == ("target_settings.bogus", "fc")


def test_target_missing_on_one_of_several_selected_modules_names_that_module():
    model = Container()
    with pytest.raises(ConfigError) as info:
        canonicalize(model, [{"op_names": ["fc", "nobias"], "target_names": ["weight", "bias"]}], "distillation")
    assert info.value.module == "nobias"
