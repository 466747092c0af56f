"""``slim``: Liu et al., "Learning Efficient Convolutional Networks through Network Slimming",
ICCV 2017.

Every block of a target (by default every output channel) gets a trainable scaling factor,
initialised to 1, that multiplies the target in forward; ``comp.loss()`` is the L1 regulariser
``regular_scale * sum(|factor|)``, which drives unimportant factors towards 0. The metric is
``|factor|``. The factors stay in the forward pass while the model is wrapped and are baked
into the tensor by ``unwrap(model, bake=True)``, so the masked model computes what was trained.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import attrs
import torch
from torch import nn

from compress_core import ConfigError, Pruner, TargetRecord
from compress_core.config import SettingError
from compress_core.pruner import MaskHandler
from compress_core.wrapper import ModuleWrapper

from ._blocks import expand_grid, grid_shape, state, trainable


def _non_negative(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if not value >= 0:
        raise SettingError(attribute.name, f"must be a number >= 0, got {value!r}")


@attrs.frozen(kw_only=True)
class SlimParams:
    """Parameters of ``slim``."""

    regular_scale: float = attrs.field(default=1e-4, validator=_non_negative)
    """Weight of the L1 regulariser on the scaling factors in ``comp.loss()``."""


class ScaledMaskHandler(MaskHandler):
    """Multiplies the target by a per-block factor, then applies the mask."""

    def __init__(self, base: MaskHandler, factor_name: str, block: tuple[int, ...] | None) -> None:
        super().__init__(base.mask_name, base.apply_method)
        self.factor_name = factor_name
        self.block = block

    def scaled(self, module: nn.Module, value: torch.Tensor) -> torch.Tensor:
        factor = state(module, self.factor_name)
        if self.block is not None:
            factor = expand_grid(factor, self.block, tuple(value.shape))
        return value * factor.to(value.dtype)

    def __call__(self, module: nn.Module, value: torch.Tensor) -> torch.Tensor:
        return super().__call__(module, self.scaled(module, value))

    def bake(self, module: nn.Module, value: torch.Tensor) -> torch.Tensor:
        return self(module, value)


class SlimPruner(Pruner):
    params_cls: ClassVar[type | None] = SlimParams
    needs_training: ClassVar[bool] = True
    default_granularity: ClassVar[str] = "out_channel"
    activation_statistic: ClassVar[str | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._factors: dict[tuple[str, str], str] = {}
        self._channels: dict[tuple[str, str], int] = {}

    def validate(self) -> None:
        super().validate()
        for record in self.records:
            if not record.target.is_tensor_attribute and record.settings.align is None:
                key = (record.module_name, record.target_name)
                self._channels[key] = activation_channels(self.module(record), record)

    def make_handler(self, module: nn.Module, wrapper: ModuleWrapper, record: TargetRecord) -> MaskHandler:
        base = super().make_handler(module, wrapper, record)
        key = (record.module_name, record.target_name)
        if record.settings.align is not None:
            return base
        block = self._blocks[key] if record.target.is_tensor_attribute else None
        if record.target.is_tensor_attribute:
            target = getattr(module, record.target_name)
            shape = grid_shape(tuple(target.shape), self._blocks[key])
            init = torch.ones(shape, dtype=target.dtype, device=target.device)
        else:
            init = torch.ones(self._channels[key], device=_device(module))
        name = wrapper.register_state(module, record.target_name, "pruning", "slim_factor", init, trainable=True)
        self._factors[key] = name
        handler = ScaledMaskHandler(base, name, block)
        self._handlers[key] = handler
        return handler

    def loss(self) -> torch.Tensor:
        total = super().loss()
        for (module_name, _), name in self._factors.items():
            total = total + state(self._modules[module_name], name).abs().sum().to(total.dtype)
        return total * self.params.regular_scale

    def parameters(self) -> Iterator[nn.Parameter]:
        for (module_name, _), name in self._factors.items():
            yield trainable(self._modules[module_name], name)

    def metric_input(self, record: TargetRecord) -> torch.Tensor:
        name = self._factors[(record.module_name, record.target_name)]
        return state(self.module(record), name).detach()

    def metric(self, record: TargetRecord, value: torch.Tensor, block: tuple[int, ...]) -> torch.Tensor:
        return value.abs()


def _device(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")


def activation_channels(module: nn.Module, record: TargetRecord) -> int:
    """Size of the last dim of an input/output target, known before data flows.

    Trainable per-channel tensors must exist when the user builds the optimizer, so the
    channel count is read from the module rather than from the first batch.
    """
    output = record.target_name.startswith("_output")
    if isinstance(module, nn.Linear):
        return module.out_features if output else module.in_features
    if isinstance(module, nn.LayerNorm) and module.normalized_shape:
        return int(module.normalized_shape[-1])
    if isinstance(module, nn.Embedding) and output:
        return module.embedding_dim
    raise ConfigError(
        f"cannot tell the channel count of {record.target_name} of {type(module).__name__} before "
        "data flows; trainable per-channel pruning of inputs/outputs supports Linear, LayerNorm "
        "and Embedding outputs (other inputs/outputs can be pruned by align)",
        entry=record.entry,
        key=f"target_settings.{record.target_name}",
        module=record.module_name,
    )
