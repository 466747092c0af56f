"""Compressors inside a PyTorch Lightning ``Trainer``.

A compressor needs two things from a training loop: its ``loss()`` added to the task loss of
every forward, and its ``step()`` called after every ``optimizer.step()``.
:class:`CompressionCallback` does both for the user's own ``LightningModule``, which keeps its
``training_step``, ``configure_optimizers``, data and strategy:

* the loss: for the length of ``fit`` the module's ``training_step`` is wrapped so that the loss
  it returns (a tensor, or the ``"loss"`` of a dict) gets :func:`add_compression_loss`'s terms.
  The wrapper runs where Lightning calls ``training_step``, inside the strategy's forward (so
  DDP sees the terms' graph), and before Lightning divides the loss for gradient accumulation,
  as the Hugging Face ``compute_loss`` does. Under manual optimization Lightning never looks at
  the returned loss: pass ``add_loss=False`` and call :meth:`CompressionCallback.loss` before
  ``manual_backward``.
* the step: ``on_train_batch_end`` calls ``step()`` once for every optimizer step Lightning
  took during the batch (the advance of ``trainer.global_step``), so batches that only
  accumulate gradients step nothing and every compressor's step count equals
  ``trainer.global_step``, Lightning's own count that ``max_steps`` uses. This is the Hugging
  Face callback's ``on_step_end``; Lightning has no hook after the optimizer step itself.

Trainable tensors a method adds (slim factors, LSQ scales, adapters) are registered on the
model, so an optimizer that ``configure_optimizers`` builds from ``self.parameters()`` after
``compress_core.create`` already has them; at ``on_fit_start`` the callback checks that one does.
Devices and ranks stay the strategy's: the wrapped modules move with the model, DDP averages
their gradients, and the methods reduce their own statistics over the ranks
(``compress_core.distributed``). ``comp.compress()`` is the user's call after ``fit``, as in a
hand-written loop.

Needs the ``lightning`` extra::

    comp = compress_core.create("agp", model, config, pruner="l1_norm", interval_steps=10)
    trainer = L.Trainer(max_steps=1000, callbacks=[CompressionCallback(comp)])
    trainer.fit(MyModule(model), train_loader)
    masks = comp.compress()
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy

from ..compressor import Compressor
from ..errors import CompressError
from ._loss import add_compression_loss

__all__ = ["CompressionCallback", "add_compression_loss"]


class CompressionCallback(pl.Callback):
    """Adds the compressors' loss terms to ``training_step``'s loss and steps them.

    Put it first in ``callbacks=`` so that later callbacks (and the module's own
    ``on_train_batch_end``, which Lightning calls after every callback's) see updated masks.

    :param compressors: one compressor or several, created on the module's model with
        ``compress_core.create`` before ``fit`` (so that ``configure_optimizers`` sees their
        trainable tensors). Their terms are added in this order (a distiller weights what
        comes before it).
    :param add_loss: wrap ``training_step`` to add the terms (automatic optimization only).
        With ``False`` the module adds them itself with :meth:`loss`.
    """

    def __init__(
        self, compressors: Compressor | Sequence[Compressor], *, add_loss: bool = True
    ) -> None:
        self.compressors: list[Compressor] = (
            [compressors] if isinstance(compressors, Compressor) else list(compressors)
        )
        self.add_loss = add_loss
        self._steps_seen = 0
        self._wrapped: tuple[pl.LightningModule, Any] | None = None

    def loss(self, task_loss: torch.Tensor) -> torch.Tensor:
        """``task_loss`` plus the compressors' terms (:func:`add_compression_loss`)."""
        return add_compression_loss(task_loss, self.compressors)

    # -- hooks ---------------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _check_optimized(trainer, pl_module, self.compressors)
        if not self.add_loss:
            return
        if not pl_module.automatic_optimization:
            raise CompressError(
                "CompressionCallback(add_loss=True) adds the compressors' terms to the loss that "
                "training_step returns, which manual optimization does not backpropagate; pass "
                "add_loss=False and call callback.loss(loss) before self.manual_backward(...)"
            )
        self._wrap(pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After a checkpoint is restored: steps taken before this fit are not replayed.
        self._steps_seen = trainer.global_step

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        for _ in range(trainer.global_step - self._steps_seen):
            for comp in self.compressors:
                comp.step()
        self._steps_seen = trainer.global_step

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._unwrap()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # Lightning skips ``teardown`` when fit fails; the module must not stay wrapped.
        self._unwrap()

    # -- training_step wrapper -----------------------------------------------------------

    def _wrap(self, pl_module: pl.LightningModule) -> None:
        self._unwrap()
        # An instance attribute the user (or another wrapper) set is kept and restored.
        previous = pl_module.__dict__.get("training_step")
        original: Callable[..., Any] = pl_module.training_step

        @functools.wraps(original)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            return self._add_to_output(original(*args, **kwargs))

        # A plain attribute: nn.Module.__setattr__ stores functions on the instance, where the
        # strategies (DDP's forward redirection included) look ``training_step`` up.
        pl_module.training_step = training_step  # type: ignore[method-assign]
        self._wrapped = (pl_module, previous)

    def _unwrap(self) -> None:
        if self._wrapped is None:
            return
        pl_module, previous = self._wrapped
        self._wrapped = None
        if previous is None:
            pl_module.__dict__.pop("training_step", None)
        else:
            pl_module.training_step = previous  # type: ignore[method-assign]

    def _add_to_output(self, output: Any) -> Any:
        if isinstance(output, torch.Tensor):
            return self.loss(output)
        if isinstance(output, Mapping) and isinstance(output.get("loss"), torch.Tensor):
            return {**output, "loss": self.loss(output["loss"])}
        # None skips the batch; anything else is Lightning's to reject.
        return output


def _check_optimized(
    trainer: pl.Trainer, pl_module: pl.LightningModule, compressors: Sequence[Compressor]
) -> None:
    """Fail when no optimizer updates a compressor's trainable tensor.

    Only where the optimizers hold the module's own parameters: sharding strategies (FSDP,
    DeepSpeed) hand the optimizer flattened copies, which would all look missing.
    """
    strategy = trainer.strategy
    if not trainer.optimizers or isinstance(strategy, DeepSpeedStrategy):
        return
    if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        return
    optimized = {
        id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]
    }
    names = {id(p): name for name, p in pl_module.named_parameters()}
    missing = [
        f"{names.get(id(p), '<not a parameter of the module>')} ({comp.method})"
        for comp in compressors
        for p in comp.parameters()
        if p.requires_grad and id(p) not in optimized
    ]
    if missing:
        raise CompressError(
            f"no optimizer updates these trainable tensors of the compressors: {', '.join(missing)}; "
            "create the compressors before fit and build the optimizer in configure_optimizers "
            "from self.parameters() (or add comp.parameters() to it)"
        )
