"""The base class every compression method subclasses."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import torch
import torch.nn as nn

from .canonical import TargetRecord
from .wrapper import Handler, ModuleWrapper

__all__ = ["Compressor"]


class Compressor:
    """A compression method attached to one model.

    Subclasses set :attr:`kind` and may set :attr:`setting_cls` (a subclass of the kind's
    settings class adding method-specific keys) and :attr:`params_cls` (an attrs class of the
    method's keyword parameters). The orchestrator builds the instance from already validated
    records, calls :meth:`validate` (which may raise ``ConfigError``; the model is still
    untouched), then :meth:`make_handler` once per record while wrapping the model.

    Training-aware methods attach to the user's own loop through :meth:`loss`,
    :meth:`step` and :meth:`parameters`.
    """

    kind: ClassVar[str]
    setting_cls: ClassVar[type | None] = None
    params_cls: ClassVar[type | None] = None
    needs_training: ClassVar[bool] = False
    """Whether :meth:`compress` gives a meaningful result only after training steps
    (``loss.backward()``, ``optimizer.step()``, :meth:`step`) with the method attached;
    ``compress run`` then requires ``epochs`` on the step."""

    def __init__(self, model: nn.Module, records: list[TargetRecord], params: Any, *, method: str) -> None:
        self.model = model
        self.records = records
        # Constructed directly (not through create()), a method still gets its defaults.
        if params is None and self.params_cls is not None:
            params = self.params_cls()
        self.params = params
        self.method = method
        self._modules = dict(model.named_modules())

    def __repr__(self) -> str:
        return f"<{type(self).__name__} '{self.method}' on {len(self.records)} targets>"

    def module(self, record: TargetRecord) -> nn.Module:
        return self._modules[record.module_name]

    def validate(self) -> None:
        """Check what only the method knows (group consistency, shapes); raise ``ConfigError``."""

    def make_handler(self, module: nn.Module, wrapper: ModuleWrapper, record: TargetRecord) -> Handler:
        """Create the handler applying this method to ``record``'s target."""
        raise NotImplementedError

    def loss(self) -> torch.Tensor:
        """Extra loss terms of the current step (a scalar; zero when the method has none)."""
        return torch.zeros((), device=_device(self.model))

    def step(self) -> None:
        """Call after ``optimizer.step()``: schedules, statistics, mask updates."""

    def parameters(self) -> Iterator[nn.Parameter]:
        """Extra trainable tensors the user's optimizer should update."""
        return iter(())

    def compress(self) -> dict[str, Any]:
        """Finish compressing and return the result (masks, quantization parameters, ...)."""
        raise NotImplementedError


def _device(model: nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")
