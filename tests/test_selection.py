"""Module selection: op_names, op_names_re, op_types and the exclude_* keys.

Selection is observed through the public ``canonicalize``: a distillation entry with the
explicit target ``_output_`` yields exactly one record per selected module, of any type, so
the record module names are the selection. Expected names are written out by hand from the
module tree below.
"""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import compress_core
from compress_core import ConfigError, ConfigWarning, canonicalize


class MyLinear(nn.Linear):
    """A subclass: must not be selected by ``Linear``."""


class Net(nn.Module):
    """Module names (model order), with their types:

    ''          Net
    conv1       Conv2d
    bn1         BatchNorm2d
    relu        ReLU
    layers      Sequential
    layers.0    Linear
    layers.1    ReLU
    layers.2    Linear
    fc          Linear
    fc10        Linear
    custom      MyLinear
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.layers = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
        self.fc = nn.Linear(4, 2)
        self.fc10 = nn.Linear(2, 2)
        self.custom = MyLinear(2, 2)


class Shared(nn.Module):
    """One Linear reachable as ``first``, ``second`` and ``block.0``; ``other`` is separate."""

    def __init__(self) -> None:
        super().__init__()
        lin = nn.Linear(3, 3)
        self.first = lin
        self.other = nn.Linear(3, 3)
        self.second = lin
        self.block = nn.Sequential(lin)


ALL_LINEAR = ["layers.0", "layers.2", "fc", "fc10"]


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net()


@pytest.fixture
def shared() -> Shared:
    torch.manual_seed(0)
    return Shared()


def select(model: nn.Module, **entry) -> list[str]:
    records = canonicalize(model, [{**entry, "target_names": ["_output_"]}], "distillation")
    return [r.module_name for r in records]


def select_expect_empty(model: nn.Module, **entry) -> None:
    with pytest.warns(ConfigWarning, match=r"config_list\[0\] selects no"):
        assert select(model, **entry) == []


# -- op_names -----------------------------------------------------------------------------


def test_op_names_select_exactly_the_named_modules_in_model_order(net):
    assert select(net, op_names=["fc", "layers.0"]) == ["layers.0", "fc"]


def test_op_names_container_selects_only_the_container(net):
    assert select(net, op_names=["layers"]) == ["layers"]


def test_op_names_root_module_is_the_empty_name(net):
    assert select(net, op_names=[""]) == [""]


def test_op_names_duplicates_select_once(net):
    assert select(net, op_names=["fc", "fc"]) == ["fc"]


def test_unknown_op_names_warn_once_per_entry_naming_the_closest(net):
    with pytest.warns(ConfigWarning) as caught:
        assert select(net, op_names=["fc", "layers.00", "bnn1"]) == ["fc"]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    (text,) = messages
    assert "config_list[0]" in text
    assert "'layers.00'" in text and "'layers.0'" in text
    assert "'bnn1'" in text and "'bn1'" in text


def test_unknown_op_names_warn_once_for_each_entry(net):
    config = [
        {"op_names": ["fc", "nopenope1"], "target_names": ["_output_"]},
        {"op_names": ["nopenope2", "fc10"], "target_names": ["_output_"]},
    ]
    with pytest.warns(ConfigWarning) as caught:
        records = canonicalize(net, config, "distillation")
    assert [r.module_name for r in records] == ["fc", "fc10"]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2, messages
    assert "config_list[0]" in messages[0] and "nopenope1" in messages[0]
    assert "config_list[1]" in messages[1] and "nopenope2" in messages[1]


def test_only_unknown_op_names_warn_and_select_nothing(net):
    with pytest.warns(ConfigWarning) as caught:
        assert select(net, op_names=["ghost"]) == []
    messages = [str(w.message) for w in caught]
    assert any("ghost" in m for m in messages)
    assert any("selects no" in m for m in messages)


def test_empty_op_names_select_nothing_with_a_warning(net):
    select_expect_empty(net, op_names=[])


# -- op_names_re ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("patterns", "expected"),
    [
        (["fc"], ["fc", "fc10"]),  # re.match: a prefix match, not fullmatch
        (["fc$"], ["fc"]),
        (["fc1"], ["fc10"]),
        (["layers\\.\\d"], ["layers.0", "layers.1", "layers.2"]),
        (["layers"], ["layers", "layers.0", "layers.1", "layers.2"]),
        (["conv|bn"], ["conv1", "bn1"]),
        (["c.*1$"], ["conv1"]),
        ([".*1$"], ["conv1", "bn1", "layers.1"]),
        (["fc$", "relu"], ["relu", "fc"]),
    ],
)
def test_op_names_re_uses_re_match(net, patterns, expected):
    assert select(net, op_names_re=patterns) == expected


@pytest.mark.parametrize("pattern", ["1", "onv", "ayers", "c10"])
def test_op_names_re_is_anchored_at_the_start(net, pattern):
    # re.search would find these inside conv1 / layers / fc10; re.match does not.
    select_expect_empty(net, op_names_re=[pattern])


def test_op_names_re_matches_the_root_name(net):
    assert select(net, op_names_re=["$"]) == [""]


def test_op_names_and_op_names_re_are_a_union(net):
    assert select(net, op_names=["relu"], op_names_re=["fc"]) == ["relu", "fc", "fc10"]


@pytest.mark.parametrize("pattern", ["fc(", "[", "*", "(?P<x", "a{4294967296}"])
def test_invalid_regex_is_a_config_error(net, pattern):
    with pytest.raises(ConfigError) as info:
        canonicalize(
            net,
            [{"op_names": ["fc"], "target_names": ["_output_"]},
             {"op_names_re": ["fc", pattern], "target_names": ["_output_"]}],
            "distillation",
        )
    assert (info.value.entry, info.value.key) == (1, "op_names_re")
    assert repr(pattern) in str(info.value) or pattern in str(info.value)


# -- op_types ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Linear", "torch.nn.Linear", "torch.nn.modules.linear.Linear"])
def test_op_types_class_name_and_qualified_names(net, name):
    assert select(net, op_types=[name]) == ALL_LINEAR


def test_op_types_do_not_match_subclasses(net):
    assert "custom" not in select(net, op_types=["Linear"])
    assert select(net, op_types=["MyLinear"]) == ["custom"]
    assert select(net, op_types=[f"{MyLinear.__module__}.{MyLinear.__qualname__}"]) == ["custom"]


def test_op_types_base_class_selects_nothing(net):
    # nn.Module is a base of every module, but only the exact class counts.
    select_expect_empty(net, op_types=["torch.nn.Module"])


def test_op_types_several(net):
    assert select(net, op_types=["ReLU", "Conv2d"]) == ["conv1", "relu", "layers.1"]


def test_op_types_qualified_names_of_other_types(net):
    assert select(net, op_types=["torch.nn.BatchNorm2d"]) == ["bn1"]
    assert select(net, op_types=["torch.nn.modules.container.Sequential"]) == ["layers"]


@pytest.mark.parametrize("name", ["Nope", "linear", "nn.Linear", "torch.nn.Nope", "torch.nn.Linear.", "a..b"])
def test_op_types_that_name_nothing(net, name):
    select_expect_empty(net, op_types=[name])


def test_op_types_never_import_modules(net, tmp_path, monkeypatch):
    # A config is data: naming a type must not run a module's import-time code.
    (tmp_path / "cc_side_effect_probe.py").write_text(
        textwrap.dedent(
            """
            import builtins
            builtins.cc_side_effect_probe_ran = True
            import torch.nn as nn
            class Thing(nn.Linear):
                pass
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "cc_side_effect_probe", raising=False)
    select_expect_empty(net, op_types=["cc_side_effect_probe.Thing"])
    assert "cc_side_effect_probe" not in sys.modules
    import builtins

    assert not getattr(builtins, "cc_side_effect_probe_ran", False)


def test_op_types_qualified_name_of_an_imported_test_class(net):
    name = f"{MyLinear.__module__}.MyLinear"
    assert select(net, op_types=[name]) == ["custom"]


# -- combinations -----------------------------------------------------------------------------


def test_op_types_filter_op_names(net):
    # Spec: "Only module types in this list can be selected".
    assert select(net, op_names=["fc", "relu", "layers.1", "conv1"], op_types=["ReLU"]) == ["relu", "layers.1"]


def test_op_types_filter_op_names_re(net):
    assert select(net, op_names_re=["layers"], op_types=["Linear"]) == ["layers.0", "layers.2"]


def test_op_types_filter_leaving_nothing_warns(net):
    select_expect_empty(net, op_names=["relu"], op_types=["Linear"])


# -- exclusions --------------------------------------------------------------------------------


def test_exclude_op_names(net):
    assert select(net, op_types=["Linear"], exclude_op_names=["fc", "layers.0"]) == ["layers.2", "fc10"]


def test_exclude_op_names_is_exact(net):
    # 'layers' excludes the container only, not its children.
    assert select(net, op_types=["Linear"], exclude_op_names=["layers"]) == ALL_LINEAR


def test_exclude_op_names_re(net):
    assert select(net, op_types=["Linear"], exclude_op_names_re=["layers"]) == ["fc", "fc10"]
    assert select(net, op_types=["Linear"], exclude_op_names_re=["fc1"]) == ["layers.0", "layers.2", "fc"]


def test_exclude_op_names_re_is_anchored_at_the_start(net):
    assert select(net, op_types=["Linear"], exclude_op_names_re=["0", "2"]) == ALL_LINEAR


def test_exclude_op_types(net):
    assert select(net, op_names_re=["layers"], exclude_op_types=["ReLU", "Sequential"]) == ["layers.0", "layers.2"]


def test_exclude_op_types_qualified_and_no_subclasses(net):
    got = select(net, op_names=["fc", "custom", "relu"], exclude_op_types=["torch.nn.Linear"])
    assert got == ["relu", "custom"]


def test_exclusions_combine(net):
    got = select(
        net,
        op_names_re=[".*"],
        exclude_op_names=[""],
        exclude_op_names_re=["layers"],
        exclude_op_types=["ReLU", "BatchNorm2d"],
    )
    assert got == ["conv1", "fc", "fc10", "custom"]


def test_excluding_everything_warns(net):
    select_expect_empty(net, op_types=["Linear"], exclude_op_types=["Linear"])


@pytest.mark.parametrize("pattern", ["(", "x{2,1}"])
def test_invalid_exclude_regex_is_a_config_error(net, pattern):
    with pytest.raises(ConfigError) as info:
        select(net, op_types=["Linear"], exclude_op_names_re=[pattern])
    assert (info.value.entry, info.value.key) == (0, "exclude_op_names_re")


# -- shared modules ----------------------------------------------------------------------------


def test_shared_module_is_selected_under_its_first_name(shared):
    assert select(shared, op_names=["second"]) == ["first"]
    assert select(shared, op_names=["block.0"]) == ["first"]
    assert select(shared, op_names_re=["sec"]) == ["first"]


def test_shared_module_is_selected_once(shared):
    assert select(shared, op_names=["first", "second", "block.0"]) == ["first"]
    assert select(shared, op_types=["Linear"]) == ["first", "other"]
    assert select(shared, op_names_re=[".*"], op_types=["Linear"]) == ["first", "other"]


def test_shared_module_excluded_by_any_of_its_names(shared):
    assert select(shared, op_types=["Linear"], exclude_op_names=["second"]) == ["other"]
    assert select(shared, op_types=["Linear"], exclude_op_names_re=["block"]) == ["other"]


def test_shared_module_pruning_records_once_without_warnings(shared):
    records = canonicalize(shared, [{"op_types": ["Linear"], "sparse_ratio": 0.5}], "pruning")
    assert [(r.module_name, r.target_name) for r in records] == [
        ("first", "weight"),
        ("first", "bias"),
        ("other", "weight"),
        ("other", "bias"),
    ]


def test_shared_module_named_by_two_entries_is_configured_once(shared):
    config = [
        {"op_names": ["second"], "target_names": ["weight"], "sparse_ratio": 0.25},
        {"op_names": ["first"], "target_names": ["weight"], "sparse_ratio": 0.75},
    ]
    with pytest.warns(ConfigWarning, match=r"config_list\[1\].*first\.weight.*config_list\[0\]"):
        records = canonicalize(shared, config, "pruning")
    assert [(r.module_name, r.target_name, r.entry, r.settings.sparse_ratio) for r in records] == [
        ("first", "weight", 0, 0.25)
    ]


def test_shared_module_gets_one_wrapper(shared):
    comp = compress_core.create("level", shared, [{"op_names": ["first", "second"], "sparse_ratio": 0.5}])
    assert {(r.module_name, r.target_name) for r in comp.records} == {("first", "weight"), ("first", "bias")}
    assert len(shared.first._forward_pre_hooks) == 1
    assert len(shared.first._forward_hooks) == 1
    assert not shared.other._forward_pre_hooks
    compress_core.unwrap(shared)
    assert not shared.first._forward_pre_hooks and not shared.first._forward_hooks
