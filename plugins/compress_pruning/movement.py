"""``movement``: Sanh et al., "Movement Pruning: Adaptive Sparsity by Fine-Tuning", NeurIPS 2020.

Every block of a target gets a trainable score (initialised to 0). In forward the target is
masked by the current mask, and a straight-through term gives each score the gradient
``sum over the block of w * dL/dw'``, so scores grow for weights moving away from 0 and fall
for weights moving towards it. The metric is the score. Masks are recomputed at every
``comp.step()``: none before ``warmup_step``, then the ratio follows the cubic schedule
``ratio * (1 - (1 - (t - warmup_step) / (cooldown_begin_step - warmup_step))**3)`` and stays at
``ratio`` from ``cooldown_begin_step`` on.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import attrs
import torch
from torch import nn

from compress_core import Pruner, TargetRecord
from compress_core.config import SettingError, int_at_least
from compress_core.masks import apply_mask
from compress_core.pruner import MaskHandler
from compress_core.wrapper import ModuleWrapper

from ._blocks import expand_grid, grid_shape, state, trainable
from .slim import activation_channels

Key = tuple[str, str]


@attrs.frozen(kw_only=True)
class MovementParams:
    """Parameters of ``movement``."""

    warmup_step: int = attrs.field(default=0, validator=int_at_least(0))
    """``comp.step()`` count before which nothing is masked."""
    cooldown_begin_step: int = attrs.field(default=1000, validator=int_at_least(0))
    """``comp.step()`` count from which the full ratio holds; must exceed ``warmup_step``."""

    def __attrs_post_init__(self) -> None:
        if self.cooldown_begin_step <= self.warmup_step:
            raise SettingError(
                "cooldown_begin_step",
                f"must be greater than warmup_step ({self.warmup_step}), got {self.cooldown_begin_step}",
            )


class MovementHandler(MaskHandler):
    """Applies the mask with a straight-through path to the scores."""

    def __init__(self, base: MaskHandler, score_name: str, block: tuple[int, ...] | None) -> None:
        super().__init__(base.mask_name, base.apply_method)
        self.score_name = score_name
        self.block = block

    def __call__(self, module: nn.Module, value: torch.Tensor) -> torch.Tensor:
        out = super().__call__(module, value)
        scores = state(module, self.score_name)
        if not (torch.is_grad_enabled() and scores.requires_grad):
            return out
        if self.block is not None:
            scores = expand_grid(scores, self.block, tuple(value.shape))
        # (s - s.detach()) is exactly 0 in value; its gradient carries w * dL/dw' to the scores.
        return out + value * (scores - scores.detach()).to(value.dtype)

    def bake(self, module: nn.Module, value: torch.Tensor) -> torch.Tensor:
        return apply_mask(value, state(module, self.mask_name), self.apply_method)


class MovementPruner(Pruner):
    params_cls: ClassVar[type | None] = MovementParams
    needs_training: ClassVar[bool] = True
    default_granularity: ClassVar[str] = "out_channel"
    activation_statistic: ClassVar[str | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._scores: dict[Key, str] = {}
        self._channels: dict[Key, int] = {}
        self.steps = 0

    def validate(self) -> None:
        super().validate()
        for record in self.records:
            if not record.target.is_tensor_attribute and record.settings.align is None:
                key = (record.module_name, record.target_name)
                self._channels[key] = activation_channels(self.module(record), record)

    def make_handler(self, module: nn.Module, wrapper: ModuleWrapper, record: TargetRecord) -> MaskHandler:
        base = super().make_handler(module, wrapper, record)
        if record.settings.align is not None:
            return base
        key = (record.module_name, record.target_name)
        if record.target.is_tensor_attribute:
            block = self._blocks[key]
            target = getattr(module, record.target_name)
            init = torch.zeros(grid_shape(tuple(target.shape), block), dtype=target.dtype, device=target.device)
        else:
            block = None
            device = next((p.device for p in module.parameters()), torch.device("cpu"))
            init = torch.zeros(self._channels[key], device=device)
        name = wrapper.register_state(module, record.target_name, "pruning", "movement_score", init, trainable=True)
        self._scores[key] = name
        handler = MovementHandler(base, name, block)
        self._handlers[key] = handler
        return handler

    def parameters(self) -> Iterator[nn.Parameter]:
        for (module_name, _), name in self._scores.items():
            yield trainable(self._modules[module_name], name)

    def schedule_scale(self, step: int) -> float | None:
        """Fraction of the final ratio at ``step``; ``None`` before warm-up (no mask update)."""
        warmup, cooldown = self.params.warmup_step, self.params.cooldown_begin_step
        if step < warmup:
            return None
        if step >= cooldown:
            return 1.0
        return 1.0 - (1.0 - (step - warmup) / (cooldown - warmup)) ** 3

    def step(self) -> None:
        self.steps += 1
        if self.scheduled:
            return
        scale = self.schedule_scale(self.steps)
        if scale is not None:
            self.update_masks(scale)

    def metric_input(self, record: TargetRecord) -> torch.Tensor:
        name = self._scores[(record.module_name, record.target_name)]
        return state(self.module(record), name).detach()

    def metric(self, record: TargetRecord, value: torch.Tensor, block: tuple[int, ...]) -> torch.Tensor:
        return value
