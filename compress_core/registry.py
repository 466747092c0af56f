"""The plugin host: loads entry points, runs the registration hooks, looks methods up."""

from __future__ import annotations

import os
import re
import threading
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import importlib_metadata
import pluggy
import torch.nn as nn

from . import hookspecs
from .config import KINDS, structure_setting
from .errors import ConfigError, PluginError, UnknownMethodError

if TYPE_CHECKING:
    from .compressor import Compressor

__all__ = [
    "ALLOW_ENV",
    "BLOCK_ENV",
    "ENTRY_POINT_GROUP",
    "MethodInfo",
    "PluginHost",
    "PluginInfo",
    "PluginRegistry",
    "PluginWarning",
    "get_host",
    "set_host",
]

ENTRY_POINT_GROUP = "compress_core.plugins"
ALLOW_ENV = "COMPRESS_CORE_PLUGINS"
"""Comma-separated plugin names: when set, only these entry points are loaded."""
BLOCK_ENV = "COMPRESS_CORE_BLOCK_PLUGINS"
"""Comma-separated plugin names that are never loaded."""

_METHOD_NAME = re.compile(r"[a-z][a-z0-9_]*")
_HOOKS = ("compress_register_methods", "compress_register_defaults", "compress_register_replacers")


class PluginWarning(UserWarning):
    """A plugin could not be loaded; ``compress plugins`` shows why."""


@attrs.frozen
class MethodInfo:
    name: str
    kind: str
    compressor: type[Compressor]
    summary: str
    aliases: tuple[str, ...]
    plugin: str


@attrs.define
class PluginInfo:
    name: str
    distribution: str | None = None
    version: str | None = None
    module: str | None = None
    status: str = "ok"
    """``ok``, ``error`` or ``disabled``."""
    error: str | None = None
    methods: list[str] = attrs.field(factory=list)
    hooks: list[str] = attrs.field(factory=list)

    @property
    def origin(self) -> str:
        dist = f" from {self.distribution} {self.version}" if self.distribution else ""
        return f"plugin '{self.name}'" + (f" ({self.module})" if self.module else "") + dist


class PluginRegistry:
    """What a registration hook receives: adds methods and defaults on behalf of one plugin.

    Registrations are staged and only committed when every hook of the plugin has succeeded.
    """

    def __init__(self, host: PluginHost, plugin: PluginInfo) -> None:
        self._host = host
        self.plugin = plugin
        self.methods: list[MethodInfo] = []
        self.defaults: list[tuple[str, type, dict[str, dict[str, Any]]]] = []
        self.replacers: list[tuple[type, Any]] = []

    def add_method(
        self,
        name: str,
        compressor: type,
        *,
        summary: str,
        aliases: Sequence[str] = (),
    ) -> None:
        """Register ``compressor`` (a :class:`Compressor` subclass) under ``name``.

        :param name: snake_case method name used in configs, listings and errors.
        :param summary: one line shown by ``compress plugins``.
        :param aliases: other accepted names (e.g. NNI's class name ``L1NormPruner``).
        """
        from .compressor import Compressor

        if not isinstance(name, str) or not _METHOD_NAME.fullmatch(name):
            raise PluginError(f"method name {name!r} is not snake_case", plugin=self.plugin.name)
        if not (isinstance(compressor, type) and issubclass(compressor, Compressor)):
            raise PluginError(
                f"method '{name}': {compressor!r} is not a compress_core.Compressor subclass",
                plugin=self.plugin.name,
            )
        if compressor.kind not in KINDS:
            raise PluginError(
                f"method '{name}': kind {compressor.kind!r} is not one of {', '.join(KINDS)}",
                plugin=self.plugin.name,
            )
        if not isinstance(summary, str) or not summary.strip():
            raise PluginError(f"method '{name}' needs a one-line summary", plugin=self.plugin.name)
        self.methods.append(
            MethodInfo(
                name=name,
                kind=compressor.kind,
                compressor=compressor,
                summary=summary.strip(),
                aliases=tuple(aliases),
                plugin=self.plugin.name,
            )
        )

    def add_default_targets(
        self, kind: str, module_types: Iterable[type], targets: Mapping[str, Mapping[str, Any]]
    ) -> None:
        """Declare the default targets (and their default settings) of ``kind`` for module types."""
        if kind not in KINDS:
            raise PluginError(f"defaults for unknown kind {kind!r}", plugin=self.plugin.name)
        checked: dict[str, dict[str, Any]] = {}
        for target, settings in targets.items():
            try:
                structure_setting(settings, KINDS[kind].setting_cls, entry=None, prefix=target)
            except ConfigError as exc:
                raise PluginError(f"invalid default settings: {exc}", plugin=self.plugin.name) from exc
            checked[target] = dict(settings)
        for module_type in module_types:
            if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
                raise PluginError(f"{module_type!r} is not an nn.Module class", plugin=self.plugin.name)
            self.defaults.append((kind, module_type, checked))

    def add_module_replacer(self, module_type: type, fn: Any) -> None:
        """Register ``fn(module, keep) -> nn.Module`` to shrink ``module_type`` in speedup.

        See :func:`compress_core.hookspecs.compress_register_replacers`.
        """
        if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
            raise PluginError(f"{module_type!r} is not an nn.Module class", plugin=self.plugin.name)
        if not callable(fn):
            raise PluginError(
                f"the replacer for {module_type.__name__} is not callable", plugin=self.plugin.name
            )
        self.replacers.append((module_type, fn))


class PluginHost:
    """Owns the pluggy manager, the loaded plugins and what they registered."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self.methods: dict[str, MethodInfo] = {}
        self._aliases: dict[str, str] = {}
        self._defaults: dict[tuple[str, type], tuple[str, dict[str, dict[str, Any]]]] = {}
        self.replacers: dict[type, tuple[str, Any]] = {}
        """``module type -> (plugin, replacer)`` for speedup."""

    # -- loading ---------------------------------------------------------------------------

    def load_entry_points(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        allow = _names(environ.get(ALLOW_ENV))
        block = _names(environ.get(BLOCK_ENV)) or set()
        for ep in sorted(importlib_metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = getattr(ep, "dist", None)
            info = PluginInfo(
                name=ep.name,
                distribution=getattr(dist, "name", None),
                version=getattr(dist, "version", None),
                module=ep.value,
            )
            if (allow is not None and ep.name not in allow) or ep.name in block:
                info.status = "disabled"
                self.plugins[ep.name] = info
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # any import failure of a plugin is reported, not fatal
                self._fail(info, f"failed to load {info.origin}: {type(exc).__name__}: {exc}", exc)
                continue
            self._register(plugin, info)

    def register(
        self, plugin: object, name: str, *, distribution: str | None = None, version: str | None = None
    ) -> PluginInfo:
        """Register an already imported plugin object (used by tests and embedding code)."""
        info = PluginInfo(name=name, distribution=distribution, version=version, module=getattr(plugin, "__name__", None))
        self._register(plugin, info)
        return info

    def _register(self, plugin: object, info: PluginInfo) -> None:
        if info.name in self.plugins and self.plugins[info.name].status == "ok":
            self._fail(info, f"{info.origin}: a plugin named '{info.name}' is already registered", None)
            return
        try:
            self.pm.register(plugin, name=info.name)
        except Exception as exc:
            self._fail(info, f"failed to register {info.origin}: {type(exc).__name__}: {exc}", exc)
            return
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(plugin)
            self._fail(info, f"{info.origin} implements an unknown hook: {exc}", exc)
            return
        registry = PluginRegistry(self, info)
        try:
            for hook_name in _HOOKS:
                for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                    if impl.plugin is plugin:
                        info.hooks.append(hook_name)
                        impl.function(registry=registry)
            self._commit(registry)
        except Exception as exc:
            self.pm.unregister(plugin)
            self._fail(info, f"{info.origin} failed to register: {type(exc).__name__}: {exc}", exc)
            return
        info.methods = [m.name for m in registry.methods]
        self.plugins[info.name] = info

    def _commit(self, registry: PluginRegistry) -> None:
        owner = registry.plugin.name
        seen: dict[str, str] = {}
        for method in registry.methods:
            for name in (method.name, *method.aliases):
                existing = self._aliases.get(name.lower()) or seen.get(name.lower())
                if existing is not None:
                    other = self.methods[existing].plugin if existing in self.methods else owner
                    raise PluginError(
                        f"method name '{name}' is already registered by plugin '{other}'",
                        plugin=owner,
                    )
                seen[name.lower()] = method.name
        for kind, module_type, _ in registry.defaults:
            if (kind, module_type) in self._defaults:
                other = self._defaults[(kind, module_type)][0]
                raise PluginError(
                    f"{kind} defaults for {module_type.__name__} are already registered by plugin '{other}'",
                    plugin=owner,
                )
        for module_type, _ in registry.replacers:
            if module_type in self.replacers:
                raise PluginError(
                    f"a speedup replacer for {module_type.__name__} is already registered "
                    f"by plugin '{self.replacers[module_type][0]}'",
                    plugin=owner,
                )
        for method in registry.methods:
            self.methods[method.name] = method
        self._aliases.update(seen)
        for kind, module_type, targets in registry.defaults:
            self._defaults[(kind, module_type)] = (owner, targets)
        for module_type, fn in registry.replacers:
            self.replacers[module_type] = (owner, fn)

    def _fail(self, info: PluginInfo, message: str, exc: BaseException | None) -> None:
        info.status = "error"
        info.error = message
        key = info.name
        if key in self.plugins and self.plugins[key].status == "ok":
            key = f"{info.name} ({info.distribution or info.module})"
        self.plugins[key] = info
        warnings.warn(message, PluginWarning, stacklevel=3)

    # -- lookups ---------------------------------------------------------------------------

    def method(self, name: str) -> MethodInfo:
        canonical = self._aliases.get(name.lower()) if isinstance(name, str) else None
        if canonical is None:
            raise UnknownMethodError(str(name), sorted(self.methods), self.broken_plugins())
        return self.methods[canonical]

    def broken_plugins(self) -> list[str]:
        return [p.error or p.name for p in self.plugins.values() if p.status == "error"]

    def default_targets(self, kind: str, module: nn.Module) -> dict[str, dict[str, Any]]:
        for cls in type(module).__mro__:
            found = self._defaults.get((kind, cls))
            if found is not None:
                return {target: dict(settings) for target, settings in found[1].items()}
        return {}

    def list_methods(self) -> list[MethodInfo]:
        return sorted(self.methods.values(), key=lambda m: (m.kind, m.name))


def _names(value: str | None) -> set[str] | None:
    if value is None:
        return None
    return {part.strip() for part in value.split(",") if part.strip()}


_host: PluginHost | None = None
_lock = threading.Lock()


def get_host() -> PluginHost:
    """The process-wide host, loading entry points on first use."""
    global _host
    with _lock:
        if _host is None:
            host = PluginHost()
            host.load_entry_points()
            _host = host
        return _host


def set_host(host: PluginHost | None) -> PluginHost | None:
    """Replace the process-wide host (``None``: reload from entry points on next use)."""
    global _host
    with _lock:
        previous, _host = _host, host
    return previous
