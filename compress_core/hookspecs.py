"""Hook specifications of compress-core (pluggy project ``compress_core``).

A plugin is a module (or object) with functions decorated by :data:`hookimpl` and named after
the specs below, declared as an entry point in group ``compress_core.plugins``. Every hook
receives a registry object bound to the calling plugin, so the host knows which plugin
registered what and can reject clashes by naming both plugins.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .registry import PluginRegistry

PROJECT_NAME = "compress_core"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# -------------------------------------------------------------------------
# Registration: called once per plugin, when the plugin is loaded (lazily, on the first
# lookup of a method or listing of plugins). A hook that raises marks its plugin broken:
# nothing that plugin registered is kept, and the other plugins keep working.
# -------------------------------------------------------------------------


@hookspec
def compress_register_methods(registry: PluginRegistry) -> None:
    """Register the compression methods this plugin provides.

    Called once when the plugin loads. Call ``registry.add_method(name, compressor_cls,
    summary=..., aliases=...)`` for each method; ``compressor_cls`` subclasses
    :class:`compress_core.Compressor` and its ``kind`` class attribute says whether it prunes,
    quantizes or distils.

    :param registry: the registry, bound to this plugin.
    :return: nothing; a name or alias that another plugin registered already is an error
        naming both plugins.
    """


@hookspec
def compress_register_defaults(registry: PluginRegistry) -> None:
    """Register the default targets of a kind for module types.

    Called once when the plugin loads. Call ``registry.add_default_targets(kind, module_types,
    targets)`` where ``targets`` maps target names to their default settings, e.g. for
    pruning ``Linear``: ``{"weight": {"sparse_ratio": None, ...}, "bias": {"align": {...}}}``.
    A shorthand key of a config entry goes to the default targets whose settings have that
    key. Defaults are looked up along the module class's MRO.

    :param registry: the registry, bound to this plugin.
    :return: nothing; settings are validated against the kind's settings class at once.
    """


@hookspec
def compress_register_replacers(registry: PluginRegistry) -> None:
    """Teach speedup how to shrink module types it does not know.

    Called once when the plugin loads, after ``compress_register_defaults``. Call
    ``registry.add_module_replacer(module_type, fn)``; ``fn(module, keep) -> nn.Module`` gets
    the module and ``keep`` (``{tensor_name: {dim: bool mask}}`` for its own parameters and
    buffers that shrink; empty when only a submodule changed) and returns the smaller module,
    which speedup puts back under the same dotted name. Replacers are looked up along the
    class's MRO before speedup's built-ins for ``torch.nn`` layers.

    :param registry: the registry, bound to this plugin.
    :return: nothing; a module type that another plugin claimed already is an error naming
        both plugins.
    """
