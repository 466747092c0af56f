"""Composes compressors on one model and enforces the rules across them.

Within one config list the configure-once (or, for quantization, overwrite) rule is applied by
:func:`~compress_core.canonical.canonicalize`. Across compressors a (module, target, kind)
already configured by an attached compressor is not reconfigured: the new compressor skips it
with a warning naming both. The same target may be pruned, quantized and distilled (one
compressor each); in forward the wrapper applies mask, then quantization, then recording.

The bookkeeping lives in the wrappers on the model, so the rules hold whichever
:class:`Orchestrator` (or plain :func:`create`) attached a compressor.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import attrs
import torch
import torch.nn as nn

from .canonical import TargetRecord, canonicalize
from .compressor import Compressor
from .config import field_names, structure_setting
from .errors import ConfigError, warn_config
from .registry import PluginHost, get_host
from .wrapper import get_wrapper, wrap, wrappers

__all__ = ["Orchestrator", "create", "list_methods"]


class Orchestrator:
    """Several compressors on one model, driven together from the user's training loop."""

    def __init__(self, model: nn.Module, *, host: PluginHost | None = None) -> None:
        self.model = model
        self.host = host
        self.compressors: list[Compressor] = []

    def add(self, method: str, config_list: Sequence[Mapping[str, Any]], **params: Any) -> Compressor:
        """Create ``method`` on the model with ``config_list`` and attach it.

        Everything is validated before the model is touched; if attaching fails half-way,
        what was attached is removed again, so a failure leaves the model as it was.
        """
        host = self.host or get_host()
        info = host.method(method)
        compressor_cls = info.compressor
        structured_params = _structure_params(compressor_cls, params, info.name)
        records = canonicalize(
            self.model, config_list, info.kind, setting_cls=compressor_cls.setting_cls, host=host
        )
        label = f"'{info.name}' #{len(self.compressors) + 1}"
        records = self._drop_configured(records, info.kind, info.name)
        compressor = compressor_cls(self.model, records, structured_params, method=info.name)
        compressor.validate()
        self._attach(compressor, records, label)
        self.compressors.append(compressor)
        return compressor

    def _drop_configured(self, records: list[TargetRecord], kind: str, method: str) -> list[TargetRecord]:
        modules = dict(self.model.named_modules())
        kept = []
        for record in records:
            wrapper = get_wrapper(modules[record.module_name])
            owner = wrapper.owner(record.target_name, kind) if wrapper else None
            if owner is None:
                kept.append(record)
                continue
            warn_config(
                f"{record.module_name}.{record.target_name} is configured for {kind} by {owner} "
                f"already; config_list[{record.entry}] of '{method}' does not take effect there"
            )
        return kept

    def _attach(self, compressor: Compressor, records: list[TargetRecord], label: str) -> None:
        modules = dict(self.model.named_modules())
        created: list[nn.Module] = []
        touched: list[tuple[nn.Module, str]] = []
        try:
            for record in records:
                module = modules[record.module_name]
                if get_wrapper(module) is None:
                    created.append(module)
                wrapper = wrap(module, record.module_name)
                # Recorded before make_handler: it may register state and then fail.
                touched.append((module, record.target_name))
                handler = compressor.make_handler(module, wrapper, record)
                wrapper.add(record.target, record.kind, handler, f"{label} config_list[{record.entry}]")
        except BaseException:
            for module, target in reversed(touched):
                found = get_wrapper(module)
                if found is not None:
                    found.remove(module, target, compressor.kind)
            for module in created:
                found = get_wrapper(module)
                if found is not None:
                    found.uninstall(module)
            raise

    # -- the training-loop facade ----------------------------------------------------------

    def loss(self) -> torch.Tensor:
        total: torch.Tensor | None = None
        for compressor in self.compressors:
            term = compressor.loss()
            total = term if total is None else total + term
        if total is None:
            return torch.zeros(())
        return total

    def step(self) -> None:
        for compressor in self.compressors:
            compressor.step()

    def parameters(self) -> Iterator[nn.Parameter]:
        for compressor in self.compressors:
            yield from compressor.parameters()

    def compress(self) -> dict[str, Any]:
        """Finish every compressor; ``{method: result}`` (``method#2`` for a repeated method)."""
        results: dict[str, Any] = {}
        for compressor in self.compressors:
            name = compressor.method
            count = sum(1 for k in results if k == name or k.startswith(f"{name}#"))
            results[name if count == 0 else f"{name}#{count + 1}"] = compressor.compress()
        return results


def create(method: str, model: nn.Module, config_list: Sequence[Mapping[str, Any]], **params: Any) -> Compressor:
    """Create the compressor ``method`` (a registered name or alias) attached to ``model``."""
    return Orchestrator(model).add(method, config_list, **params)


def list_methods() -> list[dict[str, Any]]:
    """Every registered method: name, kind, summary, aliases, plugin."""
    return [
        {"name": m.name, "kind": m.kind, "summary": m.summary, "aliases": list(m.aliases), "plugin": m.plugin}
        for m in get_host().list_methods()
    ]


def _structure_params(compressor_cls: type[Compressor], params: Mapping[str, Any], method: str) -> Any:
    # A method whose parameters depend on another method's (the pruning schedules take
    # `pruner=<name>` plus that method's own parameters) structures them itself.
    custom = getattr(compressor_cls, "structure_params", None)
    if callable(custom):
        return custom(params, method)
    params_cls = compressor_cls.params_cls
    if params_cls is None:
        if params:
            raise ConfigError(f"method '{method}' takes no parameters, got {', '.join(sorted(params))}", key=sorted(params)[0])
        return None
    if not attrs.has(params_cls):
        raise TypeError(f"{compressor_cls.__name__}.params_cls must be an attrs class")
    known = field_names(params_cls)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ConfigError(
            f"method '{method}' has no parameter '{unknown[0]}' (parameters: {', '.join(known)})",
            key=unknown[0],
        )
    try:
        return structure_setting(params, params_cls, entry=None)
    except ConfigError as exc:
        raise ConfigError(f"'{method}' parameter: {exc.reason}", key=exc.key) from None


def attached(model: nn.Module) -> list[str]:
    """Names of the wrapped modules of ``model``."""
    return [name for name, _, _ in wrappers(model)]
