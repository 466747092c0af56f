"""Which modules a config entry selects (``op_names``, ``op_names_re``, ``op_types``, ``exclude_*``)."""

from __future__ import annotations

import difflib
import re
import sys

import torch.nn as nn

from .config import EntryCommon
from .errors import ConfigError, warn_config

__all__ = ["module_names", "select_modules", "type_matches"]


def module_names(model: nn.Module) -> dict[str, nn.Module]:
    """Every name under which a module is reachable, shared modules included."""
    return dict(model.named_modules(remove_duplicate=False))


def canonical_names(model: nn.Module) -> dict[int, str]:
    """``id(module) -> the first name it is reachable under``: a shared module is one target."""
    return {id(module): name for name, module in model.named_modules()}


def type_matches(module_type: type, type_names: tuple[str, ...]) -> bool:
    """True when one of ``type_names`` names the class itself (no subclass matching)."""
    for name in type_names:
        if name == module_type.__name__ or name == f"{module_type.__module__}.{module_type.__qualname__}":
            return True
        if "." in name and _resolve_type(name) is module_type:
            return True
    return False


def _resolve_type(dotted: str) -> object:
    """The object ``dotted`` names in an already imported module, else ``None``.

    "torch.nn.Linear" is the public spelling of torch.nn.modules.linear.Linear. Nothing is
    imported: a config string must not run code, and a class of a module in the model lives
    in a module that is imported already.
    """
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        found: object = sys.modules.get(".".join(parts[:cut]))
        if found is None:
            continue
        for attribute in parts[cut:]:
            found = getattr(found, attribute, None)
            if found is None:
                break
        if found is not None:
            return found
    return None


def select_modules(model: nn.Module, entry: EntryCommon, index: int) -> dict[str, nn.Module]:
    """The modules ``entry`` selects, by canonical name, in model order.

    Names in ``op_names`` that match no module are ignored with one warning per entry that
    names the closest existing module, as the spec says.
    """
    all_names = module_names(model)
    canonical = canonical_names(model)
    chosen: dict[int, nn.Module] = {}

    if entry.op_names is not None or entry.op_names_re is not None:
        missing = [n for n in entry.op_names or () if n not in all_names]
        if missing:
            hints = []
            for name in missing:
                close = difflib.get_close_matches(name, list(all_names), n=1)
                hints.append(f"'{name}'" + (f" (closest: '{close[0]}')" if close else ""))
            warn_config(
                f"config_list[{index}].op_names: no module named {', '.join(hints)}; ignored"
            )
        for name in entry.op_names or ():
            if name in all_names:
                chosen.setdefault(id(all_names[name]), all_names[name])
        patterns = [re.compile(p) for p in entry.op_names_re or ()]
        for name, module in all_names.items():
            if any(p.match(name) for p in patterns):
                chosen.setdefault(id(module), module)
        if entry.op_types is not None:
            chosen = {k: m for k, m in chosen.items() if type_matches(type(m), entry.op_types)}
    else:
        assert entry.op_types is not None  # EntryCommon guarantees one selector
        for module in all_names.values():
            if type_matches(type(module), entry.op_types):
                chosen.setdefault(id(module), module)

    excluded: set[int] = set()
    for name in entry.exclude_op_names or ():
        if name in all_names:
            excluded.add(id(all_names[name]))
    exclude_patterns = [re.compile(p) for p in entry.exclude_op_names_re or ()]
    for name, module in all_names.items():
        if any(p.match(name) for p in exclude_patterns):
            excluded.add(id(module))
    if entry.exclude_op_types:
        excluded.update(k for k, m in chosen.items() if type_matches(type(m), entry.exclude_op_types))

    selected = {canonical[k]: m for k, m in chosen.items() if k not in excluded}
    order = {name: i for i, name in enumerate(canonical.values())}
    return dict(sorted(selected.items(), key=lambda item: order[item[0]]))


def check_module_name(model: nn.Module, name: str, *, entry: int, key: str) -> str:
    """The canonical name of the module ``name`` refers to, or a ConfigError naming ``key``."""
    all_names = module_names(model)
    if name not in all_names:
        close = difflib.get_close_matches(name, list(all_names), n=1)
        hint = f" (closest: '{close[0]}')" if close else ""
        raise ConfigError(f"no module named '{name}'{hint}", entry=entry, key=key)
    return canonical_names(model)[id(all_names[name])]
