"""The loss arithmetic every framework integration shares (no framework imported here)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["add_compression_loss"]


def add_compression_loss(task_loss: torch.Tensor, compressors: Sequence[Any]) -> torch.Tensor:
    """``task_loss`` with every compressor's terms, in order.

    A distiller's ``total_loss`` weights what came before it by its ``origin_loss_lambda``;
    every other compressor adds ``loss()``.
    """
    loss = task_loss
    for comp in compressors:
        total = getattr(comp, "total_loss", None)
        loss = total(loss) if callable(total) else loss + comp.loss().to(loss.device)
    return loss
