"""Property tests over generated config lists and small models.

* ``create('level', model, config_list)`` returns a compressor or raises ``ConfigError``,
  never another exception, and after a ``ConfigError`` the model is bitwise unchanged (state,
  parameter identities, hooks, attributes, buffers).
* After a successful ``create``, ``unwrap(model)`` restores that same state.
* ``canonicalize`` for every kind raises nothing but ``ConfigError``.
* Selection equals an independent oracle built from ``named_modules`` and ``re.match``.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import compress_core
from compress_core import ConfigError, ConfigWarning, canonicalize

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- small models ------------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(8, 4, bias=False)
        self.bn = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.bn(self.fc2(self.relu(self.fc1(x)))))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.block(self.bn1(self.conv1(x)))
        return self.fc(self.pool(x).flatten(1))


class SharedEmb(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 4)
        self.proj = nn.Linear(4, 4)
        self.tied = self.proj  # a shared module under a second name
        self.out = nn.Linear(4, 6)

    def forward(self, ids):
        return self.out(self.tied(self.proj(self.emb(ids))))


MODELS = [MLP, ConvNet, SharedEmb]
ALL_NAMES = sorted({name for cls in MODELS for name, _ in cls().named_modules(remove_duplicate=False)})


def make_model(cls: type) -> nn.Module:
    torch.manual_seed(0)
    return cls()


# -- model snapshots ---------------------------------------------------------------------------


def snapshot(model: nn.Module) -> dict[str, Any]:
    modules = []
    for name, module in model.named_modules(remove_duplicate=False):
        modules.append(
            (
                name,
                type(module),
                sorted(module.__dict__),
                list(module._parameters),
                list(module._buffers),
                sorted(module._non_persistent_buffers_set),
                list(module._modules),
                {h: len(getattr(module, h)) for h in HOOK_DICTS},
                module.training,
            )
        )
    return {
        "modules": modules,
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "ids": {k: id(v) for k, v in model.named_parameters(remove_duplicate=False)},
        "buffer_ids": {k: id(v) for k, v in model.named_buffers(remove_duplicate=False)},
    }


HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def assert_unchanged(model: nn.Module, before: dict[str, Any]) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["ids"] == before["ids"]
    assert after["buffer_ids"] == before["buffer_ids"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        other = after["state"][key]
        assert other.dtype == value.dtype and other.shape == value.shape, key
        assert torch.equal(other, value), key
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert "_compress_wrapper" not in module.__dict__


# -- config strategies -------------------------------------------------------------------------

module_name = st.sampled_from(ALL_NAMES + ["ghost", "fc", "layers.0", "block.9"])
regex = st.sampled_from(["fc", "fc\\d$", "block", "conv|bn", ".*", "(", "[a-", "head$", "t.*", "a{4294967296}", "x*?+"])
type_name = st.sampled_from(
    [
        "Linear", "Conv2d", "BatchNorm1d", "BatchNorm2d", "ReLU", "Embedding", "Sequential",
        "torch.nn.Linear", "torch.nn.modules.conv.Conv2d", "torch.nn.Embedding", "Nope", "torch.nn.Nope",
        "linear", "a..b", ".", "",
    ]
)
target_name = st.sampled_from(
    [
        "weight", "bias", "_input_", "_input_0", "_input_1", "_input_input", "_input_x", "_output_",
        "_output_0", "_output_1", "_output_logits", "running_mean", "num_batches_tracked", "nope",
        "fc1.weight", "", "_input_ids",
    ]
)
junk = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.text(max_size=4), st.just([1.5]), st.just({}))


def str_list(elements):
    """Mostly a list, sometimes a bare string or junk (wrong types must be ConfigErrors)."""
    return st.one_of(
        st.lists(elements, max_size=3),
        st.lists(elements, max_size=3).map(tuple),
        elements,
        st.lists(st.one_of(elements, junk), min_size=1, max_size=2),
        junk,
    )


ratio = st.one_of(
    st.floats(-0.5, 1.5, allow_nan=False),
    st.sampled_from([0, 1, 0.0, 1.0, 0.5, float("nan"), float("inf")]),
    junk,
)
granularity = st.one_of(
    st.sampled_from(["default", "in_channel", "out_channel", "per_channel", "element", "bogus"]),
    st.lists(st.integers(-2, 4), max_size=4),
    st.just([1.5]),
    junk,
)
align = st.one_of(
    st.fixed_dictionaries(
        {"target_name": target_name, "dims": st.lists(st.integers(-3, 3), max_size=2)},
        optional={"module_name": st.one_of(module_name, st.none())},
    ),
    st.just({"target_name": "weight"}),
    st.just({"target_name": "weight", "dims": [0], "bogus": 1}),
    st.just({"target_name": "weight", "dims": [0], 3: 4}),
    junk,
)
pruning_values = {
    "sparse_ratio": ratio,
    "max_sparse_ratio": ratio,
    "min_sparse_ratio": ratio,
    "sparse_threshold": st.one_of(st.floats(-1, 2, allow_nan=False), junk),
    "global_group_id": st.one_of(st.sampled_from(["g", 1, 2]), junk, st.just(1.5)),
    "dependency_group_id": st.one_of(st.sampled_from(["d", 1]), junk),
    "granularity": granularity,
    "internal_metric_block": st.one_of(st.integers(-1, 3), junk),
    "apply_method": st.one_of(st.sampled_from(["mul", "add", "mse"]), junk),
    "align": align,
}
bad_keys = st.sampled_from(["sparse_ratoi", "quant_dtype", "lambda", "fuse_names", "op_name", "weight"])


def setting_dicts(values: dict[str, st.SearchStrategy]) -> st.SearchStrategy:
    keys = st.sampled_from(sorted(values))
    base = st.lists(keys, max_size=3, unique=True).flatmap(
        lambda ks: st.fixed_dictionaries({k: values[k] for k in ks})
    )
    return st.one_of(
        base,
        base.flatmap(lambda d: st.tuples(bad_keys, junk).map(lambda kv: {**d, kv[0]: kv[1]})),
    )


def entries(values: dict[str, st.SearchStrategy]) -> st.SearchStrategy:
    selectors = st.fixed_dictionaries(
        {},
        optional={
            "op_names": str_list(module_name),
            "op_names_re": str_list(regex),
            "op_types": str_list(type_name),
            "exclude_op_names": str_list(module_name),
            "exclude_op_names_re": str_list(regex),
            "exclude_op_types": str_list(type_name),
            "target_names": str_list(target_name),
            "target_settings": st.one_of(
                st.dictionaries(target_name, st.one_of(setting_dicts(values), junk), max_size=2), junk
            ),
        },
    )
    return st.tuples(selectors, setting_dicts(values)).map(lambda pair: {**pair[0], **pair[1]})


def config_lists(values: dict[str, st.SearchStrategy]) -> st.SearchStrategy:
    """Anything at all: wrong shapes, wrong types, unknown keys (mostly rejected early)."""
    return st.one_of(
        st.lists(entries(values), min_size=1, max_size=3),
        st.lists(st.one_of(entries(values), junk), min_size=1, max_size=2),
        junk,
    )


# Mostly well-formed entries with a few mutations, so that validation deep inside (settings,
# targets, groups, align, granularity against shapes) is reached as well.

good_names = st.lists(st.sampled_from(ALL_NAMES), min_size=1, max_size=3)
good_types = st.lists(
    st.sampled_from(["Linear", "Conv2d", "BatchNorm1d", "BatchNorm2d", "Embedding", "ReLU", "torch.nn.Linear"]),
    min_size=1,
    max_size=2,
)
good_regex = st.lists(st.sampled_from(["fc", "block", "conv|bn", "head$", "p", "e", ".*"]), min_size=1, max_size=2)
good_selector = st.one_of(
    st.fixed_dictionaries({"op_names": good_names}),
    st.fixed_dictionaries({"op_types": good_types}),
    st.fixed_dictionaries({"op_types": good_types}),
    st.fixed_dictionaries({"op_names_re": good_regex}),
    st.fixed_dictionaries({"op_names_re": good_regex, "op_types": good_types}),
).flatmap(
    lambda sel: st.fixed_dictionaries(
        {k: st.just(v) for k, v in sel.items()},
        optional={
            "exclude_op_names": st.lists(st.sampled_from(ALL_NAMES), max_size=1),
            "exclude_op_types": st.lists(st.sampled_from(["ReLU", "Linear"]), max_size=1),
        },
    )
)
good_target = st.sampled_from(["weight", "bias", "_output_", "_input_", "_input_0", "running_mean"])
good_pruning = {
    "sparse_ratio": st.sampled_from([0.0, 0.3, 0.5, 1.0, 1]),
    "max_sparse_ratio": st.sampled_from([0.6, 1.0, None]),
    "min_sparse_ratio": st.sampled_from([0.0, 0.2, None]),
    "global_group_id": st.sampled_from(["g", 1]),
    "dependency_group_id": st.sampled_from(["d", 2]),
    "granularity": st.one_of(
        st.sampled_from(["default", "element", "out_channel", "in_channel", "per_channel"]),
        st.lists(st.sampled_from([-1, 1, 2, 4]), min_size=1, max_size=2),
    ),
    "internal_metric_block": st.sampled_from([1, 2]),
    "apply_method": st.sampled_from(["mul", "add"]),
    "align": st.fixed_dictionaries(
        {"target_name": st.sampled_from(["weight", "bias", "_output_"]), "dims": st.sampled_from([[0], [1], [0, 1], []])},
        optional={"module_name": st.sampled_from(ALL_NAMES)},
    ),
}


def good_settings(n: int = 3) -> st.SearchStrategy:
    return st.lists(st.sampled_from(sorted(good_pruning)), max_size=n, unique=True).flatmap(
        lambda ks: st.fixed_dictionaries({k: good_pruning[k] for k in ks})
    )


@st.composite
def mutated_entry(draw, mutations: st.SearchStrategy[int] = st.integers(0, 2)) -> dict[str, Any]:  # noqa: B008  # hypothesis composites take strategies as defaults
    entry: dict[str, Any] = dict(draw(good_selector))
    if draw(st.booleans()):
        entry["target_names"] = draw(st.lists(good_target, min_size=1, max_size=3))
    if draw(st.booleans()):
        entry["target_settings"] = draw(st.dictionaries(good_target, good_settings(2), max_size=2))
    entry["sparse_ratio"] = draw(good_pruning["sparse_ratio"])
    entry.update(draw(good_settings()))
    for _ in range(draw(mutations)):
        how = draw(
            st.sampled_from(["junk value", "bad value", "bad value", "bad key", "drop selectors", "nested", "odd keys"])
        )
        if how == "junk value" and entry:
            entry[draw(st.sampled_from(sorted(entry, key=repr)))] = draw(junk)
        elif how == "bad value":
            key = draw(st.sampled_from(sorted(pruning_values)))
            entry[key] = draw(pruning_values[key])
        elif how == "bad key":
            entry[draw(bad_keys)] = draw(st.one_of(junk, st.just(0.5)))
        elif how == "drop selectors":
            for key in ("op_names", "op_names_re", "op_types"):
                entry.pop(key, None)
        elif how == "nested":
            target = draw(target_name)
            entry.setdefault("target_settings", {})
            if isinstance(entry["target_settings"], dict):
                entry["target_settings"][target] = draw(st.one_of(setting_dicts(pruning_values), junk))
        elif how == "odd keys":
            # Non-string keys where the config language expects key names.
            odd = draw(st.sampled_from([1, None, ("a",), 2.5]))
            where = draw(st.sampled_from(["entry", "target_settings", "settings", "align"]))
            if where == "entry":
                entry[odd] = 0.5
            elif where == "target_settings":
                entry["target_settings"] = {odd: {"sparse_ratio": 0.5}}
            elif where == "settings":
                entry["target_settings"] = {draw(good_target): {odd: 0.5, "sparse_ratio": 0.5}}
            else:
                entry["align"] = {"target_name": "weight", "dims": [0], odd: 1}
    return entry


mutated_config_lists = st.lists(mutated_entry(), min_size=1, max_size=3)
# One entry that is well-formed but for exactly one mutation, after a well-formed entry or not.
single_mutation_lists = st.tuples(
    st.lists(mutated_entry(st.just(0)), max_size=1), mutated_entry(st.just(1))
).map(lambda pair: [*pair[0], pair[1]])


# -- properties ---------------------------------------------------------------------------------


@SETTINGS
@given(
    model_cls=st.sampled_from(MODELS),
    config_list=st.one_of(config_lists(pruning_values), mutated_config_lists, mutated_config_lists),
)
def test_create_returns_a_compressor_or_raises_config_error_leaving_the_model_as_it_was(model_cls, config_list):
    check_create(model_cls, config_list)


@SETTINGS
@given(model_cls=st.sampled_from(MODELS), config_list=single_mutation_lists)
def test_create_with_one_mutation_returns_a_compressor_or_raises_config_error(model_cls, config_list):
    check_create(model_cls, config_list)


def check_create(model_cls: type, config_list: Any) -> None:
    model = make_model(model_cls)
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        try:
            compressor = compress_core.create("level", model, config_list)
        except ConfigError as exc:
            assert exc.entry is None or isinstance(exc.entry, int)
            assert exc.key is None or isinstance(exc.key, str)
            assert exc.module is None or isinstance(exc.module, str)
            assert str(exc)
            assert_unchanged(model, before)
            return
    assert isinstance(compressor, compress_core.Pruner)
    compress_core.unwrap(model)
    assert_unchanged(model, before)


valid_pruning_values = {
    "sparse_ratio": st.sampled_from([0.0, 0.25, 0.5, 1.0]),
    "granularity": st.sampled_from(["default", "element", "out_channel"]),
    "apply_method": st.sampled_from(["mul", "add"]),
}


@SETTINGS
@given(
    model_cls=st.sampled_from(MODELS),
    op_types=st.lists(st.sampled_from(["Linear", "Conv2d", "BatchNorm1d", "BatchNorm2d", "Embedding"]), min_size=1, max_size=3),
    extra=st.fixed_dictionaries({}, optional=valid_pruning_values),
)
def test_valid_pruning_configs_attach_and_run(model_cls, op_types, extra):
    model = make_model(model_cls)
    before = snapshot(model)
    config = [{"op_types": op_types, "sparse_ratio": 0.5, **extra}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        try:
            compressor = compress_core.create("level", model, config)
        except ConfigError as exc:
            # Only block/granularity combinations may be rejected; never anything else.
            assert "granularity" in (exc.key or ""), str(exc)
            assert_unchanged(model, before)
            return
    records = compressor.records
    expected_modules = {
        name for name, module in model.named_modules() if type(module).__name__ in op_types
    }
    assert {r.module_name for r in records} == expected_modules
    masks = compressor.compress()
    for record in records:
        mask = masks[record.module_name][record.target_name]
        assert mask.shape == getattr(dict(model.named_modules())[record.module_name], record.target_name).shape
    compress_core.unwrap(model)
    assert_unchanged(model, before)


quant_values = {
    "quant_dtype": st.one_of(st.sampled_from(["int8", "uint4", "int1", "int9", "float8", "INT8"]), junk),
    "quant_scheme": st.one_of(st.sampled_from(["affine", "symmetric", "asym"]), junk),
    "granularity": granularity,
    "fuse_names": st.one_of(
        st.lists(st.lists(module_name, max_size=3), max_size=2), st.lists(module_name, max_size=2), junk
    ),
}
distil_values = {
    "lambda": st.one_of(st.floats(-1, 2, allow_nan=False), st.integers(0, 3), junk),
    "link": st.one_of(module_name, st.lists(st.one_of(module_name, junk), max_size=2), junk),
    "apply_method": st.one_of(st.sampled_from(["mse", "kl", "mul"]), junk),
}


@SETTINGS
@given(
    model_cls=st.sampled_from(MODELS),
    kind_and_config=st.one_of(
        config_lists(quant_values).map(lambda c: ("quantization", c)),
        config_lists(distil_values).map(lambda c: ("distillation", c)),
        config_lists(pruning_values).map(lambda c: ("pruning", c)),
    ),
)
def test_canonicalize_raises_only_config_errors(model_cls, kind_and_config):
    kind, config_list = kind_and_config
    model = make_model(model_cls)
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        try:
            records = canonicalize(model, config_list, kind)
        except ConfigError:
            records = None
    assert_unchanged(model, before)
    if records is not None:
        keys = [(r.module_name, r.target_name) for r in records]
        assert len(keys) == len(set(keys)), "one record per (module, target)"
        assert all(r.kind == kind for r in records)
        names = dict(model.named_modules())
        assert all(r.module_name in names for r in records)


# -- selection against an oracle -------------------------------------------------------------

valid_regex = st.sampled_from(["fc", "fc\\d$", "block", "conv|bn", ".*", "head$", "t.*", "e", "p.*j"])
valid_type = st.sampled_from(
    ["Linear", "Conv2d", "BatchNorm1d", "BatchNorm2d", "ReLU", "Embedding", "Sequential", "torch.nn.Linear",
     "torch.nn.modules.conv.Conv2d", "Nope"]
)

QUALIFIED = {
    "torch.nn.Linear": nn.Linear,
    "torch.nn.modules.conv.Conv2d": nn.Conv2d,
}


def oracle(model: nn.Module, entry: dict[str, Any]) -> list[str]:
    def type_ok(module: nn.Module, names: list[str]) -> bool:
        return any(type(module).__name__ == n or QUALIFIED.get(n) is type(module) for n in names)

    everything = list(model.named_modules(remove_duplicate=False))
    first_name: dict[int, str] = {}
    for name, module in everything:
        first_name.setdefault(id(module), name)
    chosen: set[int] = set()
    if "op_names" in entry or "op_names_re" in entry:
        for name, module in everything:
            if name in entry.get("op_names", []) or any(re.match(p, name) for p in entry.get("op_names_re", [])):
                chosen.add(id(module))
        if "op_types" in entry:
            chosen = {i for i in chosen if type_ok(next(m for _, m in everything if id(m) == i), entry["op_types"])}
    else:
        chosen = {id(m) for _, m in everything if type_ok(m, entry["op_types"])}
    for name, module in everything:
        if name in entry.get("exclude_op_names", []):
            chosen.discard(id(module))
        if any(re.match(p, name) for p in entry.get("exclude_op_names_re", [])):
            chosen.discard(id(module))
        if "exclude_op_types" in entry and type_ok(module, entry["exclude_op_types"]):
            chosen.discard(id(module))
    order = [name for name, _ in model.named_modules()]
    return sorted({first_name[i] for i in chosen}, key=order.index)


@SETTINGS
@given(
    model_cls=st.sampled_from(MODELS),
    entry=st.fixed_dictionaries(
        {},
        optional={
            "op_names": st.lists(st.sampled_from(ALL_NAMES), max_size=3),
            "op_names_re": st.lists(valid_regex, max_size=2),
            "op_types": st.lists(valid_type, max_size=2),
            "exclude_op_names": st.lists(st.sampled_from(ALL_NAMES), max_size=2),
            "exclude_op_names_re": st.lists(valid_regex, max_size=1),
            "exclude_op_types": st.lists(valid_type, max_size=1),
        },
    ).filter(lambda e: {"op_names", "op_names_re", "op_types"} & e.keys()),
)
def test_selection_matches_an_independent_oracle(model_cls, entry):
    model = make_model(model_cls)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        records = canonicalize(model, [{**entry, "target_names": ["_output_"]}], "distillation")
    assert [r.module_name for r in records] == oracle(model, entry)


@pytest.mark.parametrize("model_cls", MODELS)
def test_models_run(model_cls):
    # The models themselves are sound (guards the fixtures of the properties above).
    model = make_model(model_cls).eval()
    example = {MLP: torch.randn(2, 8), ConvNet: torch.randn(2, 2, 5, 5), SharedEmb: torch.tensor([[1, 2]])}[model_cls]
    model(example)
