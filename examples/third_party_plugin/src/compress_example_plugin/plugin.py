"""Entry point of the example plugin (group ``compress_core.plugins``, name ``example``)."""

from __future__ import annotations

from compress_core import PluginRegistry, hookimpl

from .random_pruner import RandomPruner


@hookimpl
def compress_register_methods(registry: PluginRegistry) -> None:
    registry.add_method(
        "random",
        RandomPruner,
        summary="random pruning baseline: masks blocks with the lowest seeded random score",
        aliases=("RandomPruner",),
    )
