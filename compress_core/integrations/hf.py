"""Compressors inside a Hugging Face ``transformers.Trainer``.

A compressor needs two things from a training loop: its ``loss()`` added to the task loss of
every forward, and its ``step()`` called after every ``optimizer.step()``. The Trainer owns its
loop, so :class:`CompressionCallback` does the second (``on_step_end`` runs once per optimizer
step, after gradient accumulation) and :class:`CompressionTrainer` the first (its
``compute_loss`` adds the terms). Everything else (optimizer, scheduler, data, devices) stays the
Trainer's. Trainable tensors a method adds (slim factors, movement scores) are registered on
the model, so the Trainer's optimizer, built after ``compress_core.create``, already has them.

Needs the ``hf`` extra (``transformers`` and ``accelerate``, which ``Trainer`` requires)::

    comp = compress_core.create("agp", model, config, pruner="l1_norm", interval_steps=10)
    trainer = CompressionTrainer(model=model, args=args, train_dataset=data, compressors=[comp])
    trainer.train()
    masks = comp.compress()
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

# Shared with the Lightning integration, which must not import transformers.
from ._loss import add_compression_loss

__all__ = ["CompressionCallback", "CompressionTrainer", "add_compression_loss"]


class CompressionCallback(TrainerCallback):
    """Calls ``step()`` of every compressor after each optimizer step of the Trainer."""

    def __init__(self, compressors: Sequence[Any]) -> None:
        self.compressors = list(compressors)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        for comp in self.compressors:
            comp.step()


class CompressionTrainer(Trainer):
    """A ``Trainer`` whose loss includes the compressors' terms and that steps them.

    :param compressors: compressors created on ``model`` (``compress_core.create``) before
        the Trainer; their ``step()`` runs through a :class:`CompressionCallback` added first.
    """

    def __init__(self, *args: Any, compressors: Sequence[Any] = (), **kwargs: Any) -> None:
        self.compressors = list(compressors)
        super().__init__(*args, **kwargs)
        # First, so later callbacks (logging, early stopping) see the updated masks.
        self.callback_handler.callbacks.insert(0, CompressionCallback(self.compressors))

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """The Trainer's task loss plus :func:`add_compression_loss`'s terms."""
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        loss = add_compression_loss(loss, self.compressors)
        return (loss, outputs) if return_outputs else loss
