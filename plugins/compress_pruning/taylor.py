"""``taylor``: first-order Taylor importance (Molchanov et al., "Importance Estimation for
Neural Network Pruning", CVPR 2019).

While the user trains, every backward pass adds ``(w * dL/dw)**2`` of each target element (of
the masked value used in forward) to an importance sum; the metric of a block is the sum over
the block of that importance averaged over the counted ``comp.step()`` calls. After
``training_steps`` steps the masks are computed and collection stops (under a ``linear``/``agp``
schedule collection restarts after every mask update, so each update sees fresh gradients).
On inputs/outputs the importance is ``(x * dL/dx)**2`` summed over every row, per channel.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs
import torch
from torch import nn

from compress_core import ConfigError, Pruner, TargetRecord
from compress_core.config import int_at_least
from compress_core.distributed import all_reduce_mean_
from compress_core.masks import block_reduce
from compress_core.pruner import MaskHandler
from compress_core.wrapper import ModuleWrapper

Key = tuple[str, str]


@attrs.frozen(kw_only=True)
class TaylorParams:
    """Parameters of ``taylor``."""

    training_steps: int = attrs.field(default=100, validator=int_at_least(1))
    """Number of ``comp.step()`` calls whose gradients are accumulated before masks are set."""


class TaylorHandler(MaskHandler):
    """Applies the mask and, while collecting, hooks the gradient of the masked value."""

    def __init__(self, base: MaskHandler, pruner: TaylorPruner, key: Key) -> None:
        super().__init__(base.mask_name, base.apply_method)
        self.pruner = pruner
        self.key = key

    def __call__(self, module: nn.Module, value: torch.Tensor) -> torch.Tensor:
        out = super().__call__(module, value)
        if self.pruner.collecting and torch.is_grad_enabled() and out.requires_grad:
            seen = out.detach()
            out.register_hook(lambda grad: self.pruner.accumulate(self.key, seen, grad))
        return out


class TaylorPruner(Pruner):
    params_cls: ClassVar[type | None] = TaylorParams
    needs_training: ClassVar[bool] = True
    default_granularity: ClassVar[str] = "out_channel"
    activation_statistic: ClassVar[str | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sums: dict[Key, torch.Tensor] = {}
        self._importance: dict[Key, torch.Tensor] = {}
        self._steps = 0
        self._done = False

    @property
    def collecting(self) -> bool:
        return not self._done and self._steps < self.params.training_steps

    def make_handler(self, module: nn.Module, wrapper: ModuleWrapper, record: TargetRecord) -> MaskHandler:
        base = super().make_handler(module, wrapper, record)
        if record.settings.align is not None:
            return base
        key = (record.module_name, record.target_name)
        handler = TaylorHandler(base, self, key)
        self._handlers[key] = handler
        return handler

    def accumulate(self, key: Key, value: torch.Tensor, grad: torch.Tensor) -> None:
        with torch.no_grad():
            term = (value.to(torch.float32) * grad.to(torch.float32)).square()
            if key[1].startswith(("_input", "_output")):
                term = term.reshape(-1, term.shape[-1]).sum(0)
            if key in self._sums and self._sums[key].shape == term.shape:
                self._sums[key] += term
            else:
                self._sums[key] = term.clone()

    def step(self) -> None:
        if not self.collecting:
            return
        self._steps += 1
        if self._steps >= self.params.training_steps and not self.scheduled:
            self.update_masks()
            self._done = True

    def update_masks(self, ratio_scale: float | None = None) -> None:
        if self._sums:
            # Every rank freezes the same keys in the same order, so the collectives match.
            steps = max(self._steps, 1)
            self._importance = {key: all_reduce_mean_(total / steps) for key, total in self._sums.items()}
            self._sums = {}
            self._steps = 0
        super().update_masks(ratio_scale)

    def metric_input(self, record: TargetRecord) -> torch.Tensor:
        key = (record.module_name, record.target_name)
        if key not in self._importance:
            raise ConfigError(
                "no gradient seen yet: run training steps (forward, backward, comp.step()) before compress()",
                entry=record.entry,
                key=f"target_settings.{record.target_name}",
                module=record.module_name,
            )
        return self._importance[key]

    def metric(self, record: TargetRecord, value: torch.Tensor, block: tuple[int, ...]) -> torch.Tensor:
        if not record.target.is_tensor_attribute:
            return value
        return block_reduce(value, block, "sum")
