"""The example third-party distribution, installed for real, found through its entry point.

CI installs it with ``pip install ./examples/third_party_plugin`` (not editable); these tests
check what a user of any third-party plugin relies on: it is listed with its distribution, its
method works from a config, and the allow/block lists hide it.
"""

from __future__ import annotations

import copy
import math

import importlib_metadata
import pytest
import torch
import torch.nn as nn

import compress_core
from compress_core import ConfigError, Orchestrator, PluginHost, UnknownMethodError
from compress_core.registry import ALLOW_ENV, BLOCK_ENV, ENTRY_POINT_GROUP

pytest.importorskip("compress_example_plugin")  # only a guard: CI installs it

DISTRIBUTION = "compress-example-plugin"


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 5))


def fresh_host(environ: dict[str, str]) -> PluginHost:
    host = PluginHost()
    host.load_entry_points(environ=environ)
    return host


def random_masks(model: nn.Module, config_list, **params) -> dict[str, dict[str, torch.Tensor]]:
    comp = compress_core.create("random", model, config_list, **params)
    return comp.compress()


# -- discovery -------------------------------------------------------------------------------


def test_entry_point_is_declared_by_the_installed_distribution():
    found = [
        ep
        for ep in importlib_metadata.entry_points(group=ENTRY_POINT_GROUP)
        if ep.name == "example"
    ]
    assert len(found) == 1
    (ep,) = found
    assert ep.value == "compress_example_plugin.plugin"
    assert ep.dist.name == DISTRIBUTION
    requires = importlib_metadata.requires(DISTRIBUTION) or []
    assert [r.split(";")[0].strip() for r in requires] == ["compress-core"]


def test_listed_by_the_host_with_distribution_and_version():
    info = compress_core.get_host().plugins["example"]
    assert info.status == "ok", info.error
    assert info.distribution == DISTRIBUTION
    assert info.version == importlib_metadata.version(DISTRIBUTION) == "0.1.0"
    assert info.module == "compress_example_plugin.plugin"
    assert info.methods == ["random"]
    assert info.hooks == ["compress_register_methods"]
    listed = [m for m in compress_core.list_methods() if m["name"] == "random"]
    assert listed == [
        {
            "name": "random",
            "kind": "pruning",
            "summary": listed[0]["summary"],
            "aliases": ["RandomPruner"],
            "plugin": "example",
        }
    ]
    assert listed[0]["summary"].strip()


@pytest.mark.parametrize("name", ["random", "RandomPruner", "randompruner"])
def test_method_and_alias_resolve(name):
    from compress_example_plugin import RandomPruner

    method = compress_core.get_host().method(name)
    assert (method.name, method.compressor, method.plugin) == ("random", RandomPruner, "example")
    assert issubclass(method.compressor, compress_core.Pruner)


# -- using it from a config ------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.77, 1.0])
def test_sparsity_is_exactly_floor_n_r(ratio):
    model = make_model()
    masks = random_masks(model, [{"op_types": ["Linear"], "sparse_ratio": ratio}], seed=3)
    assert set(masks) == {"0", "2"}
    for name, n in (("0", 70), ("2", 35)):
        weight_mask = masks[name]["weight"]
        assert (
            weight_mask.dtype == torch.bool
            and weight_mask.shape == model.get_submodule(name).weight.shape
        )
        assert int((~weight_mask).sum()) == math.floor(n * ratio + 1e-9)


def test_out_channel_granularity_masks_whole_rows():
    model = make_model()
    masks = random_masks(
        model, [{"op_names": ["0"], "sparse_ratio": 0.5, "granularity": "out_channel"}], seed=1
    )
    weight_mask = masks["0"]["weight"]
    rows_kept = weight_mask.all(dim=1)
    assert torch.equal(rows_kept, weight_mask.any(dim=1))  # each row all kept or all masked
    assert int((~rows_kept).sum()) == 3  # floor(7 * 0.5)
    # The bias follows its weight rows (the built-in pruning defaults align it on dim 0).
    assert torch.equal(masks["0"]["bias"], rows_kept)


def test_masks_apply_in_forward():
    model = make_model()
    masks = random_masks(model, [{"op_types": ["Linear"], "sparse_ratio": 0.5}], seed=0)
    x = torch.randn(4, 10)
    hidden = torch.relu(
        torch.nn.functional.linear(
            x, model[0].weight * masks["0"]["weight"], model[0].bias * masks["0"]["bias"]
        )
    )
    expected = torch.nn.functional.linear(
        hidden, model[2].weight * masks["2"]["weight"], model[2].bias * masks["2"]["bias"]
    )
    torch.testing.assert_close(model(x), expected)
    compress_core.unwrap(model)


def test_deterministic_per_seed_and_independent_of_weights_and_global_rng():
    config = [{"op_types": ["Linear"], "sparse_ratio": 0.5}]
    torch.manual_seed(123)
    first = random_masks(make_model(0), config, seed=3)
    torch.manual_seed(456)
    same_seed_other_weights = random_masks(make_model(1), config, seed=3)
    other_seed = random_masks(make_model(0), config, seed=4)
    default_seed = random_masks(make_model(0), config)
    for name in ("0", "2"):
        assert torch.equal(first[name]["weight"], same_seed_other_weights[name]["weight"])
    assert not torch.equal(first["0"]["weight"], other_seed["0"]["weight"])
    assert not torch.equal(first["0"]["weight"], default_seed["0"]["weight"])


def test_recompressing_gives_the_same_masks():
    model = make_model()
    comp = compress_core.create(
        "random", model, [{"op_types": ["Linear"], "sparse_ratio": 0.4}], seed=7
    )
    first = {k: {t: m.clone() for t, m in v.items()} for k, v in comp.compress().items()}
    again = comp.compress()
    for name, targets in first.items():
        for target, mask in targets.items():
            assert torch.equal(mask, again[name][target])


def test_two_layers_get_different_draws():
    # Same shape, same seed: the target's name is part of the seed.
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    masks = random_masks(model, [{"op_types": ["Linear"], "sparse_ratio": 0.5}], seed=0)
    assert not torch.equal(masks["0"]["weight"], masks["1"]["weight"])


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"sed": 3}, "sed"),
        ({"seed": "3"}, "integer"),
        ({"seed": 1.5}, "integer"),
        ({"seed": 3, "ratio": 0.5}, "ratio"),
    ],
)
def test_bad_parameters_are_config_errors_before_the_model_is_touched(params, words):
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=words):
        compress_core.create(
            "random", model, [{"op_types": ["Linear"], "sparse_ratio": 0.5}], **params
        )
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_works_with_other_compressors_in_an_orchestrator():
    model = make_model()
    orch = Orchestrator(model)
    orch.add("random", [{"op_names": ["0"], "sparse_ratio": 0.5}], seed=2)
    orch.add("level", [{"op_names": ["2"], "sparse_ratio": 0.2}])
    result = orch.compress()
    assert set(result) == {"random", "level"}
    assert set(result["random"]) == {"0"} and set(result["level"]) == {"2"}
    assert int((~result["random"]["0"]["weight"]).sum()) == 35
    assert int((~result["level"]["2"]["weight"]).sum()) == 7


# -- allow and block lists -------------------------------------------------------------------


def test_block_list_hides_it():
    host = fresh_host({BLOCK_ENV: "example"})
    assert host.plugins["example"].status == "disabled"
    assert host.plugins["example"].distribution == DISTRIBUTION
    assert "random" not in [m.name for m in host.list_methods()]
    with pytest.raises(UnknownMethodError, match=r"registered: .*level"):
        host.method("random")
    with pytest.raises(UnknownMethodError):
        Orchestrator(make_model(), host=host).add(
            "RandomPruner", [{"op_types": ["Linear"], "sparse_ratio": 0.5}]
        )
    assert host.method("level").plugin == "pruning"


def test_allow_list_without_it_hides_it():
    host = fresh_host({ALLOW_ENV: "pruning"})
    assert host.plugins["example"].status == "disabled"
    with pytest.raises(UnknownMethodError):
        host.method("random")
    assert host.method("level").plugin == "pruning"


def test_allow_list_with_only_it():
    host = fresh_host({ALLOW_ENV: "example"})
    assert host.plugins["example"].status == "ok"
    assert host.plugins["pruning"].status == "disabled"
    assert [m.name for m in host.list_methods()] == ["random"]
    # Without the built-in plugin there are no default targets: name them explicitly.
    model = make_model()
    comp = Orchestrator(model, host=host).add(
        "random",
        [{"op_types": ["Linear"], "target_names": ["weight"], "sparse_ratio": 0.5}],
        seed=5,
    )
    masks = comp.compress()
    assert {name: set(t) for name, t in masks.items()} == {"0": {"weight"}, "2": {"weight"}}
    assert int((~masks["0"]["weight"]).sum()) == 35


def test_block_list_from_the_environment(monkeypatch):
    monkeypatch.setenv(BLOCK_ENV, "example")
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    host = PluginHost()
    host.load_entry_points()
    assert host.plugins["example"].status == "disabled"


def test_masks_of_a_copy_match():
    # The plugin's state lives on the model like the built-in's: a deep copy masks the same.
    model = make_model()
    random_masks(model, [{"op_types": ["Linear"], "sparse_ratio": 0.5}], seed=9)
    clone = copy.deepcopy(model)
    x = torch.randn(3, 10)
    assert torch.equal(model(x), clone(x))
