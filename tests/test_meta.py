"""Meta-tests: every hook is documented in docs/hooks.md, called by the host and tested.

Adding a hookspec without a docs heading, a test or host support fails here (datasette's
approach); the docs' examples are run as well.
"""

from __future__ import annotations

import inspect
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from compress_core import Orchestrator, PluginHost, hookspecs
from compress_core import registry as registry_module
from compress_core.registry import ALLOW_ENV

ROOT = Path(__file__).resolve().parent.parent
HOOKS_DOC = ROOT / "docs" / "hooks.md"
TESTS = Path(__file__).resolve().parent
SPEC_MARK = f"{hookspecs.PROJECT_NAME}_spec"


def hook_names() -> list[str]:
    return [
        name
        for name, function in inspect.getmembers(hookspecs, inspect.isfunction)
        if hasattr(function, SPEC_MARK)
    ]


HOOKS = hook_names()


def doc_sections() -> dict[str, str]:
    """``## heading`` -> the text up to the next ``## `` heading."""
    sections: dict[str, str] = {}
    current = None
    for line in HOOKS_DOC.read_text().splitlines():
        match = re.match(r"^## +(.+?)\s*$", line)
        if match:
            current = match.group(1).strip("` ")
            sections[current] = ""
        elif current is not None:
            sections[current] += line + "\n"
    return sections


def test_hookspecs_are_found():
    assert "compress_register_methods" in HOOKS
    assert "compress_register_defaults" in HOOKS
    assert all(name.startswith("compress_") for name in HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented(hook):
    sections = doc_sections()
    assert hook in sections, f"docs/hooks.md has no '## {hook}' heading"
    body = sections[hook]
    for part in ("When it is called", "Parameters", "Return contract", "```python"):
        assert part in body, f"docs/hooks.md '## {hook}' lacks {part!r}"
    assert f"def {hook}(" in body, f"the example under '## {hook}' does not implement it"


def test_no_documented_hook_is_stale():
    documented = [name for name in doc_sections() if name.startswith("compress_")]
    assert sorted(documented) == sorted(HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_docstring_with_params_and_return(hook):
    doc = inspect.getdoc(getattr(hookspecs, hook)) or ""
    assert ":param" in doc and ":return" in doc


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_called_by_the_host(hook):
    # The host calls registration hooks itself, per plugin; a spec it does not call is dead.
    assert hook in registry_module._HOOKS


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_exercised_by_a_test(hook):
    users = [
        path.name
        for path in sorted(TESTS.glob("test_*.py"))
        if path.name != Path(__file__).name and re.search(rf"\b{hook}\b", path.read_text())
    ]
    assert users, f"no test under tests/ mentions {hook}"


def doc_examples() -> str:
    blocks = re.findall(r"```python\n(.*?)```", HOOKS_DOC.read_text(), flags=re.DOTALL)
    assert blocks, "docs/hooks.md has no python examples"
    return "\n".join(blocks)


def test_doc_examples_run_as_a_plugin():
    namespace: dict[str, object] = {"__name__": "hooks_md_example"}
    code = compile(doc_examples(), str(HOOKS_DOC), "exec")
    exec(code, namespace)
    plugin = SimpleNamespace(**{name: namespace[name] for name in HOOKS if name in namespace})
    assert sorted(vars(plugin)) == sorted(HOOKS), "the examples should implement every hook"

    host = PluginHost()
    host.load_entry_points(environ={ALLOW_ENV: "pruning"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        info = host.register(plugin, "hooks_md", distribution="docs-example", version="0")
    assert info.status == "ok", info.error
    assert info.hooks == list(registry_module._HOOKS)
    assert host.method("MaxAbsPruner").name == "max_abs"

    # The example's defaults and method work together from a config.
    model = nn.Sequential(nn.LayerNorm(4))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([0.1, -3.0, 0.2, 2.0]))
    comp = Orchestrator(model, host=host).add(
        "max_abs", [{"op_types": ["LayerNorm"], "sparse_ratio": 0.5}], power=2.0
    )
    masks = comp.compress()
    assert torch.equal(masks["0"]["weight"], torch.tensor([False, True, False, True]))
    assert torch.equal(masks["0"]["bias"], torch.tensor([False, True, False, True]))
