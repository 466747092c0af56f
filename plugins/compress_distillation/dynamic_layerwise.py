"""``dynamic_layerwise``: each student target against its linked teacher targets; the smallest counts.

As NNI's ``DynamicLayerwiseDistiller``: a target linked to several teacher modules is pulled
toward whichever it is already closest to in this step (the minimum of the per-link losses),
which lets a shallow student choose among deeper teacher layers.
"""

from __future__ import annotations

import torch

from .distiller import LayerwiseDistiller

__all__ = ["DynamicLayerwiseDistiller"]


class DynamicLayerwiseDistiller(LayerwiseDistiller):
    """Layer-wise distillation with one or several links per target (minimum over links)."""

    def combine(self, losses: list[torch.Tensor]) -> torch.Tensor:
        return losses[0] if len(losses) == 1 else torch.stack(losses).min()
