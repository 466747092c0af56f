"""An example third-party plugin for compress-core: the ``random`` pruning baseline.

Importing this package is cheap; compress-core imports :mod:`compress_example_plugin.plugin`
through the ``compress_core.plugins`` entry point when a method is first looked up.
"""

from __future__ import annotations

from .random_pruner import RandomParams, RandomPruner

__all__ = ["RandomParams", "RandomPruner"]
