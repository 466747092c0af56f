"""``linear`` and ``agp``: iterative schedules around any other pruning method.

Zhu & Gupta, "To prune, or not to prune", 2017 (automated gradual pruning). Every
``interval_steps`` calls of ``comp.step()`` the wrapped method's masks are recomputed with each
ratio scaled by ``f(u / total_times)`` for the ``u``-th update, ``u = 1 .. total_times``:
``f(x) = x`` for ``linear`` and ``f(x) = 1 - (1 - x)**3`` for ``agp``. Before the first update
nothing is masked; after the last one the full ratios hold. ``compress()`` always returns the
masks at the full ratios.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import attrs
import torch
from torch import nn

from compress_core import Compressor, ConfigError, Pruner, TargetRecord, get_host
from compress_core.config import int_at_least, structure_setting
from compress_core.errors import UnknownMethodError
from compress_core.wrapper import Handler, ModuleWrapper


@attrs.frozen(kw_only=True)
class ScheduleKeys:
    """The schedule's own parameters; every other keyword goes to the wrapped method."""

    pruner: str
    """Name (or alias) of the pruning method whose masks are scheduled, e.g. ``l1_norm``."""
    interval_steps: int = attrs.field(default=100, validator=int_at_least(1))
    """``comp.step()`` calls between two mask updates."""
    total_times: int = attrs.field(default=10, validator=int_at_least(1))
    """Number of mask updates; the last one reaches the configured ratios."""


@attrs.frozen(kw_only=True)
class ScheduleParams:
    keys: ScheduleKeys
    method: str
    """Registered name of the wrapped method."""
    method_cls: type
    method_params: Any


class SchedulePruner(Compressor):
    kind: ClassVar[str] = "pruning"
    # The schedule counts comp.step() calls; without them compress() is the one-shot method.
    needs_training: ClassVar[bool] = True

    @staticmethod
    def fraction(x: float) -> float:
        raise NotImplementedError

    @classmethod
    def structure_params(cls, params: Mapping[str, Any], method: str) -> ScheduleParams:
        from compress_core.orchestrator import _structure_params

        own = {k: v for k, v in params.items() if k in ("pruner", "interval_steps", "total_times")}
        rest = {k: v for k, v in params.items() if k not in own}
        if "pruner" not in own:
            raise ConfigError(f"'{method}' needs pruner=<method name> (e.g. pruner='l1_norm')", key="pruner")
        try:
            keys = structure_setting(own, ScheduleKeys, entry=None)
        except ConfigError as exc:
            raise ConfigError(f"'{method}' parameter: {exc.reason}", key=exc.key) from None
        try:
            info = get_host().method(keys.pruner)
        except UnknownMethodError as exc:
            raise ConfigError(f"'{method}' parameter: {exc}", key="pruner") from None
        if not issubclass(info.compressor, Pruner):
            reason = "a schedule" if issubclass(info.compressor, SchedulePruner) else f"a {info.kind} method"
            raise ConfigError(
                f"'{method}' parameter: pruner '{keys.pruner}' is {reason}; schedules wrap a pruning method such as 'l1_norm'",
                key="pruner",
            )
        inner = _structure_params(info.compressor, rest, info.name)
        return ScheduleParams(keys=keys, method=info.name, method_cls=info.compressor, method_params=inner)

    def __init__(self, model: nn.Module, records: list[TargetRecord], params: ScheduleParams, *, method: str) -> None:
        super().__init__(model, records, params, method=method)
        self.pruner: Pruner = params.method_cls(model, records, params.method_params, method=params.method)
        # The schedule alone decides when masks change (a method's own schedule is off).
        self.pruner.scheduled = True
        self.steps = 0
        self.updates = 0

    def validate(self) -> None:
        self.pruner.validate()

    def make_handler(self, module: nn.Module, wrapper: ModuleWrapper, record: TargetRecord) -> Handler:
        return self.pruner.make_handler(module, wrapper, record)

    def loss(self) -> torch.Tensor:
        return self.pruner.loss()

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.pruner.parameters()

    @property
    def current_scale(self) -> float:
        """Fraction of the configured ratios in force (0 before the first update)."""
        return self.fraction(self.updates / self.params.keys.total_times) if self.updates else 0.0

    def step(self) -> None:
        self.pruner.step()
        self.steps += 1
        keys = self.params.keys
        if self.steps % keys.interval_steps == 0 and self.updates < keys.total_times:
            self.updates += 1
            self.pruner.ratio_scale = self.current_scale
            self.pruner.update_masks()

    def masks(self) -> dict[str, dict[str, torch.Tensor]]:
        return self.pruner.masks()

    def compress(self) -> dict[str, dict[str, torch.Tensor]]:
        self.pruner.ratio_scale = 1.0
        return self.pruner.compress()


class LinearPruner(SchedulePruner):
    @staticmethod
    def fraction(x: float) -> float:
        return x


class AGPPruner(SchedulePruner):
    @staticmethod
    def fraction(x: float) -> float:
        return 1.0 - (1.0 - x) ** 3
