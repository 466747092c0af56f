"""``adaptive1d_layerwise``: one link per target; a trainable linear adapter where widths differ.

As NNI's ``Adaptive1dLayerwiseDistiller``: when the last dimension of a student target differs
from its teacher target's (a narrower hidden size), ``nn.Linear(student_dim, teacher_dim)``
maps the student's tensor before the loss; the other dimensions must match. Shapes are learned
by running student and teacher once on ``example_inputs`` at ``create``, so the adapters exist
before the user builds the optimizer (``comp.parameters()``) or wraps the model in
``DistributedDataParallel``.

Adapters belong to the compressor, not to the student: ``model.parameters()`` and the student's
``state_dict`` stay as they were, ``comp.parameters()`` yields them and ``comp.state_dict()`` /
``comp.load_state_dict()`` save and restore them. Under ``torch.distributed`` (initialised before
``create``) their initial values are broadcast from rank 0 and their gradients are averaged over
the ranks during backward, as DDP does for the student's own parameters.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from compress_core import ConfigError, TargetRecord

from .distiller import Key, LayerwiseDistiller

__all__ = ["Adaptive1dLayerwiseDistiller"]


class Adaptive1dLayerwiseDistiller(LayerwiseDistiller):
    """Layer-wise distillation through a learned ``Linear`` adapter on the last dimension."""

    single_link: ClassVar[bool] = True
    needs_example_inputs: ClassVar[bool] = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.adapters = nn.ModuleDict()
        """Adapter per target, named ``<module>/<target>`` (dots of module names as ``/``)."""
        self._adapter_of: dict[Key, nn.Linear] = {}
        self._group: Any = None

    @staticmethod
    def adapter_name(key: Key) -> str:
        module_name, target = key
        return f"{module_name.replace('.', '/') or '<root>'}/{target}"

    def check_shapes(
        self, record: TargetRecord, student: torch.Tensor, teachers: list[tuple[str, tuple[int, ...]]]
    ) -> None:
        (name, shape), = teachers
        s_shape = tuple(student.shape)
        if not s_shape or not shape or s_shape[:-1] != shape[:-1]:
            raise ConfigError(
                f"student target '{record.target_name}' has shape {list(s_shape)} and teacher "
                f"'{name}'.{record.target_name} has {list(shape)}: only the last dimension may differ",
                entry=record.entry,
                key="link",
                module=record.module_name,
            )
        if s_shape[-1] != shape[-1]:
            key = (record.module_name, record.target_name)
            adapter = nn.Linear(s_shape[-1], shape[-1], device=student.device, dtype=student.dtype)
            self.adapters[self.adapter_name(key)] = adapter
            self._adapter_of[key] = adapter

    def validate(self) -> None:
        super().validate()
        self._share_between_ranks()

    def adapt(self, key: Key, value: torch.Tensor) -> torch.Tensor:
        adapter = self._adapter_of.get(key)
        return value if adapter is None else adapter(value)

    def combine(self, losses: list[torch.Tensor]) -> torch.Tensor:
        return losses[0]

    # -- the adapters as trainable state ---------------------------------------------------

    def parameters(self) -> Iterator[nn.Parameter]:
        """The adapters' weights and biases, for the user's optimizer."""
        yield from self.adapters.parameters()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The adapters' tensors, keyed ``<module>/<target>.weight`` / ``.bias``."""
        return dict(self.adapters.state_dict())

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Restore adapters saved by :meth:`state_dict` (strict: the same targets and shapes)."""
        self.adapters.load_state_dict(dict(state_dict))

    def to(self, *args: Any, **kwargs: Any) -> Adaptive1dLayerwiseDistiller:
        """Move the adapters (``model.to`` does not: they are not part of the student)."""
        self.adapters.to(*args, **kwargs)
        return self

    def _share_between_ranks(self) -> None:
        import torch.distributed as dist

        if not self._adapter_of or not (dist.is_available() and dist.is_initialized()):
            return
        world = dist.get_world_size()
        if world < 2:
            return
        # A group of our own: its collectives cannot interleave with DDP's bucket all-reduces
        # on the default group in a different order on different ranks.
        self._group = dist.new_group()
        group = self._group
        with torch.no_grad():
            for param in self.adapters.parameters():
                dist.broadcast(param, src=0, group=group)

        def average(param: torch.Tensor) -> None:
            if param.grad is not None:
                dist.all_reduce(param.grad, group=group)
                param.grad.div_(world)

        for param in self.adapters.parameters():
            param.register_post_accumulate_grad_hook(average)
