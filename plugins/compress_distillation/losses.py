"""The two ``apply_method`` losses of the spec ("Distillation Specific Configuration Keys")."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["distil_loss"]


def distil_loss(method: str, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``mse``: mean squared error; ``kl``: the spec's temperature-2 KL divergence.

    ``kl`` is exactly ``kl_div((s / 2).log_softmax(-1), (t / 2).softmax(-1),
    reduction='batchmean') * 2 ** 2`` as the spec writes it (``batchmean`` divides by the size
    of dimension 0).
    """
    if method == "mse":
        return F.mse_loss(student, teacher)
    if method == "kl":
        return F.kl_div(
            (student / 2).log_softmax(dim=-1), (teacher / 2).softmax(dim=-1), reduction="batchmean"
        ) * 4
    raise ValueError(f"unknown distillation apply_method {method!r}")
