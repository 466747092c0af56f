"""The plugin host: loading entry points, registration hooks, clashes, lookups.

Every test builds a fresh :class:`PluginHost`; fake plugins are small namespaces of
``hookimpl`` functions registered in the test, and fake entry points replace
``importlib_metadata.entry_points`` as :mod:`compress_core.registry` sees it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn as nn

import compress_core
from compress_core import (
    CompressError,
    Compressor,
    PluginError,
    PluginHost,
    PluginRegistry,
    PluginWarning,
    Pruner,
    UnknownMethodError,
    hookimpl,
)
from compress_core import registry as registry_module
from compress_core.registry import ALLOW_ENV, BLOCK_ENV, ENTRY_POINT_GROUP, PluginInfo

# -- fake plugins ------------------------------------------------------------------------------


class FakePruner(Pruner):
    def metric(self, record: Any, value: torch.Tensor, block: tuple[int, ...]) -> torch.Tensor:
        return value.abs()


class OtherPruner(Pruner):
    def metric(self, record: Any, value: torch.Tensor, block: tuple[int, ...]) -> torch.Tensor:
        return -value.abs()


class FakeQuantizer(Compressor):
    kind = "quantization"


def methods_plugin(
    *methods: tuple[str, type, tuple[str, ...]],
    defaults: Callable[[PluginRegistry], None] | None = None,
) -> SimpleNamespace:
    """A plugin object registering ``(name, class, aliases)`` methods (and optional defaults)."""

    @hookimpl
    def compress_register_methods(registry: PluginRegistry) -> None:
        for name, cls, aliases in methods:
            registry.add_method(name, cls, summary=f"fake method {name}", aliases=aliases)

    plugin = SimpleNamespace(compress_register_methods=compress_register_methods)
    if defaults is not None:
        plugin.compress_register_defaults = hookimpl(defaults)
    return plugin


def registering(body: Callable[[PluginRegistry], None]) -> SimpleNamespace:
    """A plugin whose compress_register_methods hook runs ``body``."""
    return SimpleNamespace(compress_register_methods=hookimpl(lambda registry: body(registry)))


@pytest.fixture
def host() -> PluginHost:
    return PluginHost()


def register(host: PluginHost, plugin: object, name: str, **kwargs: Any) -> PluginInfo:
    """Register expecting success (no PluginWarning allowed)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginWarning)
        info = host.register(plugin, name, **kwargs)
    assert info.status == "ok", info.error
    return info


def register_failing(host: PluginHost, plugin: object, name: str, **kwargs: Any) -> PluginInfo:
    """Register expecting the plugin to be reported broken (with a PluginWarning)."""
    with pytest.warns(PluginWarning) as caught:
        info = host.register(plugin, name, **kwargs)
    assert info.status == "error"
    assert info.error is not None
    assert any(info.error == str(w.message) for w in caught)
    return info


# -- fake entry points -----------------------------------------------------------------------


class FakeDist:
    def __init__(self, name: str, version: str) -> None:
        self.name = name
        self.version = version


class FakeEntryPoint:
    """What the host uses of an ``importlib_metadata.EntryPoint``: name, value, dist, load()."""

    def __init__(self, name: str, value: str, dist: FakeDist, *, obj: object = None) -> None:
        self.name = name
        self.value = value
        self.group = ENTRY_POINT_GROUP
        self.dist = dist
        self._obj = obj

    def load(self) -> object:
        if self._obj is not None:
            return self._obj
        import importlib

        return importlib.import_module(self.value)


@pytest.fixture
def entry_points(monkeypatch: pytest.MonkeyPatch) -> list[FakeEntryPoint]:
    """The entry points the host will see: append FakeEntryPoints to this list."""
    eps: list[FakeEntryPoint] = []

    def fake_entry_points(*, group: str | None = None, **_: Any) -> list[FakeEntryPoint]:
        return [ep for ep in eps if group is None or ep.group == group]

    monkeypatch.setattr(registry_module.importlib_metadata, "entry_points", fake_entry_points)
    return eps


@pytest.fixture
def plugin_modules(tmp_path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str, str], str]:
    """Write an importable module ``name`` with ``source``; removed from sys.modules afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    written: list[str] = []

    def write(name: str, source: str) -> str:
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        written.append(name)
        return name

    yield write
    for name in written:
        sys.modules.pop(name, None)


# -- loading entry points --------------------------------------------------------------------


def test_entry_points_are_loaded_with_distribution_and_version(host, entry_points):
    entry_points.append(
        FakeEntryPoint(
            "alpha",
            "compress_alpha.plugin",
            FakeDist("compress-alpha", "1.2.3"),
            obj=methods_plugin(("alpha_prune", FakePruner, ("AlphaPruner",))),
        )
    )
    host.load_entry_points(environ={})
    info = host.plugins["alpha"]
    assert (info.status, info.distribution, info.version, info.module) == (
        "ok",
        "compress-alpha",
        "1.2.3",
        "compress_alpha.plugin",
    )
    assert info.methods == ["alpha_prune"]
    assert info.hooks == ["compress_register_methods"]
    method = host.method("alpha_prune")
    assert (method.name, method.kind, method.compressor, method.plugin) == (
        "alpha_prune",
        "pruning",
        FakePruner,
        "alpha",
    )
    assert host.method("AlphaPruner") is method


def test_plugin_that_fails_to_import_is_reported_and_the_others_keep_working(
    host, entry_points, plugin_modules
):
    module = plugin_modules(
        "compress_broken_fake_plugin",
        """
        import compress_dependency_that_is_not_installed  # the cause
        """,
    )
    entry_points.append(FakeEntryPoint("broken", module, FakeDist("compress-broken", "0.3.1")))
    entry_points.append(
        FakeEntryPoint(
            "good",
            "compress_good.plugin",
            FakeDist("compress-good", "2.0"),
            obj=methods_plugin(("good_prune", FakePruner, ())),
        )
    )
    with pytest.warns(PluginWarning) as caught:
        host.load_entry_points(environ={})

    broken = host.plugins["broken"]
    assert broken.status == "error"
    for part in (
        "'broken'",
        module,
        "compress-broken",
        "0.3.1",
        "ModuleNotFoundError",
        "compress_dependency_that_is_not_installed",
    ):
        assert part in broken.error, part
    assert [str(w.message) for w in caught] == [broken.error]
    assert broken.methods == []

    assert host.plugins["good"].status == "ok"
    assert host.method("good_prune").compressor is FakePruner
    assert host.broken_plugins() == [broken.error]


def test_plugin_whose_module_raises_on_import_is_reported(host, entry_points, plugin_modules):
    module = plugin_modules("compress_raising_fake_plugin", "raise RuntimeError('needs CUDA 99')\n")
    entry_points.append(FakeEntryPoint("raising", module, FakeDist("compress-raising", "1.0")))
    with pytest.warns(PluginWarning, match="needs CUDA 99"):
        host.load_entry_points(environ={})
    assert host.plugins["raising"].status == "error"
    assert "RuntimeError" in host.plugins["raising"].error


def test_real_module_plugin_loads_through_an_entry_point(host, entry_points, plugin_modules):
    module = plugin_modules(
        "compress_module_fake_plugin",
        """
        import torch.nn as nn
        from compress_core import Pruner, hookimpl

        class ModulePruner(Pruner):
            def metric(self, record, value, block):
                return value.abs()

        @hookimpl
        def compress_register_methods(registry):
            registry.add_method("module_prune", ModulePruner, summary="from a module")

        @hookimpl
        def compress_register_defaults(registry):
            registry.add_default_targets("pruning", [nn.Linear], {"weight": {"sparse_ratio": None}})
        """,
    )
    entry_points.append(FakeEntryPoint("modular", module, FakeDist("compress-modular", "0.0.1")))
    host.load_entry_points(environ={})
    info = host.plugins["modular"]
    assert info.status == "ok"
    assert info.hooks == ["compress_register_methods", "compress_register_defaults"]
    assert set(host.default_targets("pruning", nn.Linear(2, 2))) == {"weight"}


@pytest.mark.parametrize(
    ("environ", "loaded"),
    [
        ({}, {"alpha", "beta"}),
        ({ALLOW_ENV: "beta"}, {"beta"}),
        ({ALLOW_ENV: " alpha , beta "}, {"alpha", "beta"}),
        ({BLOCK_ENV: "alpha"}, {"beta"}),
        ({ALLOW_ENV: "alpha,beta", BLOCK_ENV: "beta"}, {"alpha"}),
        ({ALLOW_ENV: ""}, set()),
    ],
)
def test_allow_and_block_lists(host, entry_points, environ, loaded):
    entry_points.append(
        FakeEntryPoint(
            "alpha",
            "a.plugin",
            FakeDist("compress-a", "1"),
            obj=methods_plugin(("alpha_prune", FakePruner, ())),
        )
    )
    entry_points.append(
        FakeEntryPoint(
            "beta",
            "b.plugin",
            FakeDist("compress-b", "1"),
            obj=methods_plugin(("beta_prune", OtherPruner, ())),
        )
    )
    host.load_entry_points(environ=environ)
    assert {n for n, p in host.plugins.items() if p.status == "ok"} == loaded
    for name in {"alpha", "beta"} - loaded:
        assert host.plugins[name].status == "disabled"
        # Listed (so `compress plugins` shows it), but nothing of it is registered.
        assert host.plugins[name].distribution is not None
        with pytest.raises(UnknownMethodError):
            host.method(f"{name}_prune")
    assert sorted(host.methods) == sorted(f"{n}_prune" for n in loaded)


def test_disabled_plugin_is_never_imported(host, entry_points, plugin_modules):
    module = plugin_modules("compress_blocked_fake_plugin", "raise AssertionError('imported')\n")
    entry_points.append(FakeEntryPoint("blocked", module, FakeDist("compress-blocked", "1")))
    host.load_entry_points(environ={BLOCK_ENV: "blocked"})
    assert host.plugins["blocked"].status == "disabled"
    assert module not in sys.modules


def test_os_environ_is_the_default(host, entry_points, monkeypatch):
    entry_points.append(
        FakeEntryPoint(
            "alpha",
            "a.plugin",
            FakeDist("compress-a", "1"),
            obj=methods_plugin(("alpha_prune", FakePruner, ())),
        )
    )
    monkeypatch.setenv(BLOCK_ENV, "alpha")
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    host.load_entry_points()
    assert host.plugins["alpha"].status == "disabled"


# -- hook validation -------------------------------------------------------------------------


def test_misspelled_hook_is_rejected(host):
    register(host, methods_plugin(("kept_prune", FakePruner, ())), "good")

    @hookimpl
    def compress_register_method(registry):  # missing the final "s"
        registry.add_method("never_prune", FakePruner, summary="never registered")

    plugin = methods_plugin(("also_never", OtherPruner, ()))
    plugin.compress_register_method = compress_register_method
    info = register_failing(host, plugin, "typo")
    assert "compress_register_method" in info.error
    assert "unknown hook" in info.error
    assert "'typo'" in info.error
    assert "never_prune" not in host.methods and "also_never" not in host.methods
    assert host.pm.get_plugin("typo") is None
    # The host keeps working, for the good plugin and for plugins loaded later.
    assert host.method("kept_prune").plugin == "good"
    register(host, methods_plugin(("later_prune", OtherPruner, ())), "later")
    assert host.method("later_prune").plugin == "later"


def test_misspelled_hook_through_entry_point(host, entry_points):
    @hookimpl
    def compress_register_default(registry):
        pass

    entry_points.append(
        FakeEntryPoint(
            "typo",
            "typo.plugin",
            FakeDist("compress-typo", "0.1"),
            obj=SimpleNamespace(compress_register_default=compress_register_default),
        )
    )
    with pytest.warns(PluginWarning, match="compress_register_default"):
        host.load_entry_points(environ={})
    assert host.plugins["typo"].status == "error"
    assert "compress-typo 0.1" in host.plugins["typo"].error


def test_hook_with_wrong_argument_name_is_rejected(host):
    @hookimpl
    def compress_register_methods(reg):
        pass

    info = register_failing(
        host, SimpleNamespace(compress_register_methods=compress_register_methods), "badargs"
    )
    assert "'badargs'" in info.error


def test_hook_that_raises_keeps_nothing(host):
    def defaults(registry: PluginRegistry) -> None:
        registry.add_default_targets("pruning", [nn.Conv2d], {"weight": {"sparse_ratio": None}})
        raise RuntimeError("defaults exploded")

    info = register_failing(
        host, methods_plugin(("half_prune", FakePruner, ()), defaults=defaults), "half"
    )
    assert "defaults exploded" in info.error
    assert "half_prune" not in host.methods
    assert host.default_targets("pruning", nn.Conv2d(1, 1, 1)) == {}
    assert host.pm.get_plugin("half") is None


def test_same_plugin_name_twice_is_rejected(host):
    register(
        host, methods_plugin(("first_prune", FakePruner, ())), "same", distribution="compress-one"
    )
    info = register_failing(
        host,
        methods_plugin(("second_prune", OtherPruner, ())),
        "same",
        distribution="compress-two",
        version="1.0",
    )
    assert "already registered" in info.error
    assert "second_prune" not in host.methods
    # Both are listed: the working one under its name, the rejected one beside it.
    assert host.plugins["same"].status == "ok"
    assert any(
        p.status == "error" and p.distribution == "compress-two" for p in host.plugins.values()
    )


# -- clashes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("second", "clash"),
    [
        ((("shared_prune", OtherPruner, ()),), "shared_prune"),
        ((("own_prune", OtherPruner, ("SharedPruner",)),), "SharedPruner"),
        ((("own_prune", OtherPruner, ("sharedpruner",)),), "sharedpruner"),  # aliases ignore case
        ((("sharedpruner", OtherPruner, ()),), "sharedpruner"),  # a name clashing with an alias
        ((("own_prune", OtherPruner, ("shared_prune",)),), "shared_prune"),  # alias vs name
    ],
)
def test_duplicate_method_name_or_alias_is_rejected_naming_both_plugins(host, second, clash):
    def first_defaults(registry):
        registry.add_default_targets("pruning", [nn.Linear], {"weight": {"sparse_ratio": None}})

    def second_defaults(registry):
        registry.add_default_targets("pruning", [nn.Conv2d], {"weight": {"sparse_ratio": None}})

    register(
        host,
        methods_plugin(("shared_prune", FakePruner, ("SharedPruner",)), defaults=first_defaults),
        "first",
        distribution="compress-first",
        version="1.0",
    )
    plugin = methods_plugin(("extra_prune", OtherPruner, ()), *second, defaults=second_defaults)
    info = register_failing(host, plugin, "second", distribution="compress-second", version="2.0")
    assert f"'{clash}'" in info.error
    assert "'first'" in info.error and "'second'" in info.error
    assert "compress-second 2.0" in info.error
    # Nothing of the rejected plugin is kept: not its other methods, not its defaults.
    assert sorted(host.methods) == ["shared_prune"]
    assert host.default_targets("pruning", nn.Conv2d(1, 1, 1)) == {}
    assert host.method("SharedPruner").plugin == "first"
    assert host.pm.get_plugin("second") is None
    assert host.plugins["first"].status == "ok" and host.plugins["second"].status == "error"


def test_duplicate_name_inside_one_plugin_is_rejected(host):
    info = register_failing(
        host,
        methods_plugin(("dup_prune", FakePruner, ()), ("other_prune", OtherPruner, ("DUP_PRUNE",))),
        "selfish",
    )
    assert "'DUP_PRUNE'" in info.error and "'selfish'" in info.error
    assert host.methods == {}


def test_duplicate_defaults_are_rejected_naming_both_plugins(host):
    def defaults(registry):
        registry.add_default_targets("pruning", [nn.Linear], {"weight": {"sparse_ratio": None}})

    register(host, methods_plugin(defaults=defaults), "first")
    info = register_failing(
        host, methods_plugin(("late_prune", FakePruner, ()), defaults=defaults), "second"
    )
    assert "Linear" in info.error and "'first'" in info.error and "'second'" in info.error
    assert "late_prune" not in host.methods


# -- what add_method / add_default_targets accept -------------------------------------------


def bound_registry(host: PluginHost) -> PluginRegistry:
    return PluginRegistry(
        host, PluginInfo(name="checked", distribution="compress-checked", version="0.1")
    )


class NotACompressor:
    kind = "pruning"


class BadKind(Compressor):
    kind = "sparsification"


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"name": "L1Norm", "compressor": FakePruner, "summary": "s"}, "snake_case"),
        ({"name": "l1-norm", "compressor": FakePruner, "summary": "s"}, "snake_case"),
        ({"name": "1level", "compressor": FakePruner, "summary": "s"}, "snake_case"),
        ({"name": "", "compressor": FakePruner, "summary": "s"}, "snake_case"),
        (
            {"name": "not_a_class", "compressor": NotACompressor, "summary": "s"},
            "Compressor subclass",
        ),
        ({"name": "an_instance", "compressor": object(), "summary": "s"}, "Compressor subclass"),
        ({"name": "a_module", "compressor": nn.Linear, "summary": "s"}, "Compressor subclass"),
        ({"name": "bad_kind", "compressor": BadKind, "summary": "s"}, "sparsification"),
        ({"name": "no_summary", "compressor": FakePruner, "summary": ""}, "summary"),
        ({"name": "blank_summary", "compressor": FakePruner, "summary": "   "}, "summary"),
        ({"name": "none_summary", "compressor": FakePruner, "summary": None}, "summary"),
    ],
)
def test_add_method_rejects(host, kwargs, words):
    kwargs = dict(kwargs)  # parametrize shares the dict between runs
    with pytest.raises(PluginError, match=words) as raised:
        bound_registry(host).add_method(kwargs.pop("name"), kwargs.pop("compressor"), **kwargs)
    assert raised.value.plugin == "checked"
    assert isinstance(raised.value, CompressError)


@pytest.mark.parametrize(
    ("kind", "types", "targets", "words"),
    [
        ("pruning", [nn.Linear], {"weight": {"sparse_ratio": 1.5}}, "sparse_ratio"),
        ("pruning", [nn.Linear], {"weight": {"sparse_ration": 0.5}}, "sparse_ration"),
        ("pruning", [nn.Linear], {"weight": {"apply_method": "div"}}, "apply_method"),
        ("quantization", [nn.Linear], {"weight": {"quant_dtype": "int9"}}, "quant_dtype"),
        (
            "distillation",
            [nn.Linear],
            {"_output_": {"apply_method": "mse", "lambda": "big"}},
            "lambda",
        ),
        ("sparsification", [nn.Linear], {"weight": {}}, "sparsification"),
        ("pruning", [int], {"weight": {}}, "nn.Module"),
        ("pruning", ["Linear"], {"weight": {}}, "nn.Module"),
    ],
)
def test_add_default_targets_rejects(host, kind, types, targets, words):
    with pytest.raises(PluginError, match=words) as raised:
        bound_registry(host).add_default_targets(kind, types, targets)
    assert raised.value.plugin == "checked"


def test_invalid_registration_reported_through_the_host(host):
    info = register_failing(
        host,
        registering(lambda r: r.add_method("BadName", FakePruner, summary="s")),
        "shouty",
        distribution="compress-shouty",
        version="0.2",
    )
    assert "snake_case" in info.error
    assert "'shouty'" in info.error and "compress-shouty 0.2" in info.error

    def bad_defaults(registry):
        registry.add_default_targets("pruning", [nn.Linear], {"weight": {"sparse_ratio": -1}})

    info = register_failing(host, methods_plugin(defaults=bad_defaults), "baddefaults")
    assert "invalid default settings" in info.error and "sparse_ratio" in info.error


def test_valid_registrations(host):
    def defaults(registry):
        registry.add_default_targets(
            "pruning",
            [nn.Linear, nn.Conv1d],
            {
                "weight": {"sparse_ratio": None},
                "bias": {"align": {"target_name": "weight", "dims": [0]}},
            },
        )
        registry.add_default_targets("quantization", [nn.ReLU], {"_input_": {}, "_output_": {}})
        registry.add_default_targets("distillation", [nn.Module], {"_output_": {"lambda": 1}})

    register(
        host,
        methods_plugin(("fake_quant", FakeQuantizer, ("FakeQuantizer",)), defaults=defaults),
        "ok",
    )
    assert host.method("fake_quant").kind == "quantization"
    assert set(host.default_targets("pruning", nn.Conv1d(1, 2, 1))) == {"weight", "bias"}
    assert set(host.default_targets("quantization", nn.ReLU())) == {"_input_", "_output_"}
    assert host.default_targets("quantization", nn.Linear(1, 1)) == {}

    class MyLinear(nn.Linear):
        pass

    # Defaults are looked up along the MRO, most specific first.
    assert set(host.default_targets("pruning", MyLinear(1, 1))) == {"weight", "bias"}
    assert set(host.default_targets("distillation", nn.Sequential())) == {"_output_"}
    # Callers get copies: changing them cannot change the registered defaults.
    host.default_targets("pruning", nn.Linear(1, 1))["weight"]["sparse_ratio"] = 0.9
    assert host.default_targets("pruning", nn.Linear(1, 1))["weight"]["sparse_ratio"] is None


# -- lookups ---------------------------------------------------------------------------------


def test_unknown_method_lists_registered_methods_and_broken_plugins(host):
    register(
        host,
        methods_plugin(("beta_prune", OtherPruner, ()), ("alpha_prune", FakePruner, ())),
        "good",
    )
    broken = register_failing(
        host, registering(lambda r: 1 / 0), "wobbly", distribution="compress-wobbly", version="0.9"
    )
    with pytest.raises(UnknownMethodError) as raised:
        host.method("wanda")
    error = raised.value
    assert isinstance(error, CompressError) and isinstance(error, KeyError)
    assert (error.method, error.registered) == ("wanda", ["alpha_prune", "beta_prune"])
    assert error.broken == [broken.error]
    text = str(error)
    assert "unknown method 'wanda'" in text
    assert "registered: alpha_prune, beta_prune" in text
    assert "compress plugins" in text
    assert "'wobbly'" in text and "compress-wobbly 0.9" in text and "division by zero" in text


def test_unknown_method_on_an_empty_host(host):
    with pytest.raises(UnknownMethodError, match=r"registered: none"):
        host.method("level")


def test_method_lookup_rejects_non_strings(host):
    with pytest.raises(UnknownMethodError):
        host.method(None)  # type: ignore[arg-type]  # user input is not typed


@pytest.mark.parametrize(
    "spelling", ["level", "LEVEL", "LevelPruner", "levelpruner", "LEVELPRUNER", "lEvElPrUnEr"]
)
def test_nni_alias_resolves_case_insensitively(host, spelling):
    host.load_entry_points(environ={ALLOW_ENV: "pruning"})
    assert host.method(spelling).name == "level"


def test_nni_alias_through_create():
    model = nn.Sequential(nn.Linear(4, 2))
    comp = compress_core.create(
        "levelpruner", model, [{"op_types": ["Linear"], "sparse_ratio": 0.5}]
    )
    assert comp.method == "level"
    compress_core.unwrap(model)


def test_list_methods_sorted_by_kind_and_name(host):
    register(
        host,
        methods_plugin(
            ("zeta_prune", FakePruner, ()),
            ("a_quant", FakeQuantizer, ()),
            ("alpha_prune", OtherPruner, ()),
        ),
        "many",
    )
    assert [(m.kind, m.name) for m in host.list_methods()] == [
        ("pruning", "alpha_prune"),
        ("pruning", "zeta_prune"),
        ("quantization", "a_quant"),
    ]


def test_builtin_plugin_listed_like_a_third_party_one():
    host = PluginHost()
    host.load_entry_points(environ={ALLOW_ENV: "pruning"})
    info = host.plugins["pruning"]
    assert (info.status, info.distribution, info.module) == (
        "ok",
        "compress-core",
        "compress_pruning.plugin",
    )
    assert info.version == compress_core.__version__
    listed = {m["name"]: m for m in compress_core.list_methods()}
    assert listed["level"] == {
        "name": "level",
        "kind": "pruning",
        "summary": listed["level"]["summary"],
        "aliases": ["LevelPruner"],
        "plugin": "pruning",
    }


def test_get_host_is_cached_and_set_host_replaces_it(host):
    previous = registry_module.set_host(host)
    try:
        assert compress_core.get_host() is host
    finally:
        registry_module.set_host(previous)


def test_importing_compress_core_imports_no_plugin():
    code = textwrap.dedent(
        """
        import sys
        import compress_core
        from compress_core import registry
        plugins = [m for m in ("compress_pruning", "compress_example_plugin") if m in sys.modules]
        assert not plugins, plugins
        assert registry._host is None, "entry points were loaded at import time"
        compress_core.get_host()
        assert "compress_pruning.plugin" in sys.modules
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
