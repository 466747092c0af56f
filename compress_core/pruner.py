"""The pruning base: every pruning key of the spec, for any metric a plugin computes.

A pruning method subclasses :class:`Pruner` and implements :meth:`Pruner.metric` (importance
of each block of a target; higher is kept). Ratios, thresholds, clamps, global and
dependency groups, ``internal_metric_block``, ``align`` and ``apply_method`` are handled
here, once, on top of :mod:`compress_core.masks`.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import Any, ClassVar

import torch
import torch.nn as nn

from . import masks as mask_math
from .canonical import TargetRecord
from .compressor import Compressor
from .config import PruningSetting
from .distributed import all_reduce_mean_, all_reduce_sum_
from .errors import ConfigError
from .selection import check_module_name
from .targets import resolve_target
from .wrapper import ModuleWrapper

__all__ = ["MaskHandler", "Pruner"]

Key = tuple[str, str]


class MaskHandler:
    """Applies a stored mask; optionally accumulates a per-channel statistic of activations.

    The statistic is the per-channel sum of ``|x|`` (``statistic="abs"``) or of ``x**2``
    (``statistic="square"``) over every observed row, plus the row count in the last slot, so
    that sums from several ranks or batches combine exactly into a mean.
    """

    def __init__(
        self, mask_name: str, apply_method: str, stat_name: str | None = None, statistic: str = "abs"
    ) -> None:
        self.mask_name = mask_name
        self.apply_method = apply_method
        self.stat_name = stat_name
        self.statistic = statistic
        self.observing = stat_name is not None
        # (mask buffer, (its _version, dtype), mask_bits): derived from the buffer, never state.
        self._bits: tuple[torch.Tensor, tuple[int, torch.dtype], torch.Tensor] | None = None

    def __call__(self, module: nn.Module, value: torch.Tensor) -> torch.Tensor:
        if self.observing and self.stat_name is not None:
            self._observe(module, value)
        mask = _buffer(module, self.mask_name)
        bits = None
        if self.apply_method == "mul" and value.element_size() in mask_math._INT_OF_SIZE:
            # Rebuilt when the buffer is replaced (compress, .to(), load_state_dict) or
            # changed in place (its version counter moves).
            key = (mask._version, value.dtype)
            cached = self._bits
            if cached is not None and cached[0] is mask and cached[1] == key:
                bits = cached[2]
            else:
                bits = mask_math.mask_bits(mask, value.dtype)
                self._bits = (mask, key, bits)
        return mask_math.apply_mask(value, mask, self.apply_method, bits=bits)

    def __getstate__(self) -> dict[str, object]:
        # Not pickled or deep-copied: torch.save(model) must not carry a second copy of the mask.
        return {**self.__dict__, "_bits": None}

    def bake(self, module: nn.Module, value: torch.Tensor) -> torch.Tensor:
        return mask_math.apply_mask(value, _buffer(module, self.mask_name), self.apply_method)

    def _observe(self, module: nn.Module, value: torch.Tensor) -> None:
        name = self.stat_name
        assert name is not None  # only observing handlers are called here
        with torch.no_grad():
            detached = value.detach()
            values = detached.abs() if self.statistic == "abs" else detached.square()
            channels = values.reshape(-1, value.shape[-1])
            stat = module._buffers.get(name)
            total = channels.sum(0, dtype=torch.float64)
            if stat is None or stat.shape[0] != value.shape[-1] + 1:
                stat = torch.zeros(value.shape[-1] + 1, dtype=torch.float64, device=value.device)
            stat[:-1] += total
            stat[-1] += channels.shape[0]
            module._buffers[name] = stat
            # Statistics are a by-product of calibration, not part of the compressed model.
            module._non_persistent_buffers_set.add(name)


class Pruner(Compressor):
    """Base class of pruning methods.

    :cvar default_granularity: what ``granularity: default`` means on parameters for this
        method (``per_channel`` is always the default on inputs/outputs).
    """

    kind: ClassVar[str] = "pruning"
    default_granularity: ClassVar[str] = "out_channel"
    activation_statistic: ClassVar[str | None] = "abs"
    """What is observed on input/output targets for :meth:`metric`: ``"abs"`` (mean ``|x|`` per
    channel), ``"square"`` (mean ``x**2``) or ``None`` (the method computes its own)."""
    prunes_activations: ClassVar[bool] = True
    """Whether the method has a metric for inputs/outputs (they can always be pruned by align)."""

    def __init__(self, model: nn.Module, records: list[TargetRecord], params: Any, *, method: str) -> None:
        super().__init__(model, records, params, method=method)
        self._by_key: dict[Key, TargetRecord] = {(r.module_name, r.target_name): r for r in records}
        self._blocks: dict[Key, tuple[int, ...]] = {}
        self._sources: dict[Key, Key] = {}
        self._handlers: dict[Key, MaskHandler] = {}
        self.ratio_scale = 1.0
        """Scales every ``sparse_ratio`` (and ``min_sparse_ratio``); schedules lower it."""
        self.scheduled = False
        """Set by a schedule (``linear``, ``agp``) wrapping this pruner: the schedule decides
        when masks change, so a method's own timing in :meth:`step` is off."""

    # -- hooks for subclasses --------------------------------------------------------------

    def metric(self, record: TargetRecord, value: torch.Tensor, block: tuple[int, ...]) -> torch.Tensor:
        """Importance of each block of ``value`` (shape: the block grid); higher is kept.

        ``value`` is the target's current (unmasked) parameter, or for input/output targets
        the observed per-channel mean absolute activation.
        """
        raise NotImplementedError

    # -- validation (before the model is touched) -----------------------------------------

    def granularity(self, record: TargetRecord) -> str | tuple[int, ...]:
        granularity = record.settings.granularity
        if granularity == "default":
            return self.default_granularity if record.target.is_tensor_attribute else "per_channel"
        return granularity

    def validate(self) -> None:
        for record in self.records:
            key = (record.module_name, record.target_name)
            settings: PruningSetting = record.settings
            if settings.align is not None:
                self._sources[key] = self._align_source(record)
                continue
            if settings.sparse_ratio is None and settings.sparse_threshold is None:
                raise ConfigError(
                    "needs sparse_ratio, sparse_threshold or align",
                    entry=record.entry,
                    key=f"target_settings.{record.target_name}",
                    module=record.module_name,
                )
            granularity = self.granularity(record)
            if record.target.is_tensor_attribute:
                shape = tuple(getattr(self.module(record), record.target_name).shape)
                activation = False
            else:
                if not self.prunes_activations:
                    raise ConfigError(
                        f"'{self.method}' has no metric for inputs/outputs; prune them with align",
                        entry=record.entry,
                        key=f"target_settings.{record.target_name}",
                        module=record.module_name,
                    )
                if not isinstance(granularity, str) or granularity not in ("per_channel",):
                    raise ConfigError(
                        "inputs/outputs are pruned per_channel (the last dimension); "
                        f"got {granularity!r}",
                        entry=record.entry,
                        key=f"target_settings.{record.target_name}.granularity",
                        module=record.module_name,
                    )
                self._blocks[key] = (1,)
                continue
            try:
                self._blocks[key] = mask_math.block_shape(granularity, shape, activation=activation)
            except ValueError as exc:
                raise ConfigError(
                    str(exc),
                    entry=record.entry,
                    key=f"target_settings.{record.target_name}.granularity",
                    module=record.module_name,
                ) from None
        self._check_groups()
        self._align_order()

    def _align_source(self, record: TargetRecord) -> Key:
        align = record.settings.align
        where = f"target_settings.{record.target_name}.align"
        module_name = record.module_name
        if align.module_name is not None:
            module_name = check_module_name(self.model, align.module_name, entry=record.entry, key=f"{where}.module_name")
        try:
            source_name = resolve_target(self._modules[module_name], align.target_name).name
        except ValueError as exc:
            raise ConfigError(str(exc), entry=record.entry, key=f"{where}.target_name", module=record.module_name) from None
        source = (module_name, source_name)
        if source not in self._by_key:
            raise ConfigError(
                f"the align source {module_name}.{source_name} is not a pruning target of this config list",
                entry=record.entry,
                key=where,
                module=record.module_name,
            )
        source_record = self._by_key[source]
        if source_record.target.is_tensor_attribute:
            source_shape = tuple(getattr(self._modules[module_name], source_name).shape)
            for dim in align.dims:
                if not -len(source_shape) <= dim < len(source_shape):
                    raise ConfigError(
                        f"dim {dim} is out of range for the source of shape {list(source_shape)}",
                        entry=record.entry,
                        key=f"{where}.dims",
                        module=record.module_name,
                    )
            if record.target.is_tensor_attribute:
                target_shape = tuple(getattr(self.module(record), record.target_name).shape)
                expected = math.prod(source_shape[d] for d in align.dims)
                if math.prod(target_shape) != expected:
                    raise ConfigError(
                        f"target of shape {list(target_shape)} cannot align with dims {list(align.dims)} "
                        f"of the source of shape {list(source_shape)} ({expected} positions)",
                        entry=record.entry,
                        key=where,
                        module=record.module_name,
                    )
        return source

    def _align_order(self) -> None:
        # Aligned targets are computed after their sources; a cycle can never resolve.
        for key in self._sources:
            seen = [key]
            current = key
            while current in self._sources:
                current = self._sources[current]
                if current in seen:
                    record = self._by_key[key]
                    chain = " -> ".join(".".join(k) for k in seen + [current])
                    raise ConfigError(
                        f"align forms a cycle: {chain}",
                        entry=record.entry,
                        key=f"target_settings.{record.target_name}.align",
                        module=record.module_name,
                    )
                seen.append(current)

    def _check_groups(self) -> None:
        for attribute, value_names in (
            ("global_group_id", ("sparse_ratio",)),
            ("dependency_group_id", ("sparse_ratio", "sparse_threshold")),
        ):
            groups: dict[Hashable, TargetRecord] = {}
            for record in self.records:
                group = getattr(record.settings, attribute)
                if group is None or record.settings.align is not None:
                    continue
                first = groups.setdefault(group, record)
                for name in value_names:
                    if getattr(first.settings, name) != getattr(record.settings, name):
                        raise ConfigError(
                            f"{attribute} {group!r}: {name} must be the same in the whole group "
                            f"({getattr(first.settings, name)} at {first.module_name}.{first.target_name}"
                            f" from config_list[{first.entry}], {getattr(record.settings, name)} here)",
                            entry=record.entry,
                            key=f"target_settings.{record.target_name}.{name}",
                            module=record.module_name,
                        )
                if attribute == "dependency_group_id" and record.target.is_tensor_attribute and first.target.is_tensor_attribute:
                    shape_a = self._grid_shape(first)
                    shape_b = self._grid_shape(record)
                    # Channel grids compare by their channels alone: an Embedding's [1, C]
                    # (in_channel) matches a Linear's [C, 1] (out_channel).
                    if _squeeze(shape_a) != _squeeze(shape_b):
                        raise ConfigError(
                            f"dependency_group_id {group!r}: prunable positions differ "
                            f"({list(shape_a)} at {first.module_name}.{first.target_name}, {list(shape_b)} here)",
                            entry=record.entry,
                            key=f"target_settings.{record.target_name}.dependency_group_id",
                            module=record.module_name,
                        )

    def _grid_shape(self, record: TargetRecord) -> tuple[int, ...]:
        key = (record.module_name, record.target_name)
        shape = getattr(self.module(record), record.target_name).shape
        return tuple(s // b for s, b in zip(shape, self._blocks[key]))

    # -- attaching --------------------------------------------------------------------------

    def make_handler(self, module: nn.Module, wrapper: ModuleWrapper, record: TargetRecord) -> MaskHandler:
        key = (record.module_name, record.target_name)
        if record.target.is_tensor_attribute:
            ndim = getattr(module, record.target_name).dim()
            placeholder = torch.ones((1,) * ndim, dtype=torch.bool, device=_device_of(module, record))
        else:
            placeholder = torch.ones(1, dtype=torch.bool, device=_device_of(module, record))
        mask_name = wrapper.register_state(module, record.target_name, "pruning", "mask", placeholder)
        stat_name = None
        statistic = self.activation_statistic
        if not record.target.is_tensor_attribute and record.settings.align is None and statistic is not None:
            stat_name = f"{record.target_name}__pruning_stat"
            wrapper.state_names.append(stat_name)
        handler = MaskHandler(mask_name, record.settings.apply_method, stat_name, statistic or "abs")
        self._handlers[key] = handler
        return handler

    # -- computing masks -------------------------------------------------------------------

    def compress(self) -> dict[str, dict[str, torch.Tensor]]:
        """Compute every mask from the current weights/statistics and return them.

        :return: ``{module_name: {target_name: mask}}``, bool masks (True = kept) shaped like
            parameter targets, and broadcastable ``[channels]`` masks for inputs/outputs.
        """
        self.update_masks()
        return self.masks()

    def update_masks(self, ratio_scale: float | None = None) -> None:
        """Recompute masks from the current metric and write them into the model.

        :param ratio_scale: scales every ``sparse_ratio`` and ``min_sparse_ratio`` (schedules
            use it); ``None`` uses :attr:`ratio_scale`. Thresholds and ``max_sparse_ratio``
            are not scaled.
        """
        if ratio_scale is None:
            ratio_scale = self.ratio_scale
        # Ranks that trained their own copies of the method's tensors (slim factors, movement
        # scores) agree on their mean first, so every rank computes the same masks.
        with torch.no_grad():
            for param in self.parameters():
                all_reduce_mean_(param.data)
        requests = []
        for record in self.records:
            key = (record.module_name, record.target_name)
            if key in self._sources:
                continue
            settings: PruningSetting = record.settings
            value = self.metric_input(record)
            block = self._blocks[key] if record.target.is_tensor_attribute else (1,)
            metric = self.metric(record, value, block).to(torch.float32)
            if settings.internal_metric_block is not None:
                # Chunks (heads, conv groups) are consecutive channels: rank them on the flat
                # grid, e.g. (out_channels,) for an out_channel grid of shape (C, 1, 1, 1).
                metric = metric.reshape(-1)
            ratio = settings.sparse_ratio
            requests.append(
                mask_math.MaskRequest(
                    key=key,
                    metric=metric,
                    block_numel=math.prod(block),
                    sparse_ratio=None if ratio is None else min(1.0, ratio * ratio_scale),
                    sparse_threshold=settings.sparse_threshold,
                    min_sparse_ratio=(
                        None if settings.min_sparse_ratio is None else min(1.0, settings.min_sparse_ratio * ratio_scale)
                    ),
                    max_sparse_ratio=settings.max_sparse_ratio,
                    global_group_id=settings.global_group_id,
                    dependency_group_id=settings.dependency_group_id,
                    internal_metric_block=settings.internal_metric_block,
                )
            )
        try:
            grids = mask_math.solve_masks(requests)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        computed: dict[Key, tuple[torch.Tensor, tuple[int, ...]]] = {}
        for record in self.records:
            key = (record.module_name, record.target_name)
            if key not in grids:
                continue
            shape = self._shape(record, grids[key])
            block = self._blocks[key] if record.target.is_tensor_attribute else (1,)
            grid = grids[key].reshape(tuple(s // b for s, b in zip(shape, block)))
            computed[key] = (mask_math.expand_mask(grid, block, shape), shape)
        pending = [k for k in self._sources]
        while pending:
            for key in list(pending):
                source = self._sources[key]
                if source not in computed:
                    continue
                record = self._by_key[key]
                source_mask, source_shape = computed[source]
                if record.target.is_tensor_attribute:
                    target_shape = tuple(getattr(self.module(record), record.target_name).shape)
                else:
                    target_shape = (math.prod(source_shape[d] for d in record.settings.align.dims),)
                mask = mask_math.align_mask(source_mask, source_shape, record.settings.align.dims, target_shape)
                computed[key] = (mask, target_shape)
                pending.remove(key)
        for key, (mask, _) in computed.items():
            record = self._by_key[key]
            module = self.module(record)
            handler = self._handlers[key]
            device = _buffer(module, handler.mask_name).device
            module._buffers[handler.mask_name] = mask.to(device)

    def metric_input(self, record: TargetRecord) -> torch.Tensor:
        """What :meth:`metric` ranks: the parameter, or the observed activation statistic.

        Activation statistics are summed over ``torch.distributed`` ranks first, so that
        every rank computes the mask of the union of the data.
        """
        module = self.module(record)
        if record.target.is_tensor_attribute:
            return getattr(module, record.target_name).detach()
        handler = self._handlers[(record.module_name, record.target_name)]
        stat = module._buffers.get(handler.stat_name) if handler.stat_name else None
        if stat is None:
            raise ConfigError(
                "no activations observed yet: run the model on data before compress() to prune inputs/outputs",
                entry=record.entry,
                key=f"target_settings.{record.target_name}",
                module=record.module_name,
            )
        stat = all_reduce_sum_(stat.clone())
        return (stat[:-1] / stat[-1].clamp(min=1)).to(torch.float32)

    def _shape(self, record: TargetRecord, grid: torch.Tensor) -> tuple[int, ...]:
        if record.target.is_tensor_attribute:
            return tuple(getattr(self.module(record), record.target_name).shape)
        return tuple(grid.shape)

    def masks(self) -> dict[str, dict[str, torch.Tensor]]:
        result: dict[str, dict[str, torch.Tensor]] = {}
        for record in self.records:
            key = (record.module_name, record.target_name)
            handler = self._handlers[key]
            module = self.module(record)
            mask = _buffer(module, handler.mask_name)
            if record.target.is_tensor_attribute:
                mask = mask.expand(getattr(module, record.target_name).shape)
            result.setdefault(record.module_name, {})[record.target_name] = mask
        return result


def _buffer(module: nn.Module, name: str) -> torch.Tensor:
    buffer = module._buffers[name]
    assert buffer is not None, f"state buffer {name!r} was removed from its module"
    return buffer


def _squeeze(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(n for n in shape if n != 1)


def _device_of(module: nn.Module, record: TargetRecord) -> torch.device:
    if record.target.is_tensor_attribute:
        return getattr(module, record.target_name).device
    for parameter in module.parameters():
        return parameter.device
    for buffer in module.buffers():
        return buffer.device
    return torch.device("cpu")
