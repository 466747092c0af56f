"""The module wrapper: applies compression to a module's targets in its forward pass.

The wrapper does not replace the module. It installs a forward pre-hook and an always-called
forward hook on the module itself, so the module keeps its identity, its place in the tree and
the names and identities of its parameters: an optimizer built before ``create`` keeps
working. During forward the pre-hook puts the compressed value of each parameter/buffer target
in the module's parameter dict and the forward hook puts the original back.

Per target the handlers run in a fixed order whatever order the compressors were attached
in: pruning (mask), then quantization, then distillation (record).

State that must follow the model (masks, scales, learned tensors) is registered on the module
as buffers/parameters named ``<target>__<kind>_<name>``, so ``.to()``, ``state_dict``,
``load_state_dict``, ``copy.deepcopy`` and ``torch.save`` carry it; :func:`unwrap` removes it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any, Protocol, cast

import torch
import torch.nn as nn

from .targets import TargetRef, get_input, map_output, set_input

__all__ = ["KIND_ORDER", "Handler", "ModuleWrapper", "get_wrapper", "unwrap", "wrap", "wrappers"]

KIND_ORDER = ("pruning", "quantization", "distillation")
_ATTRIBUTE = "_compress_wrapper"


class Handler(Protocol):
    """What a compressor installs on one (target, kind) of a wrapped module."""

    def __call__(self, module: nn.Module, value: torch.Tensor) -> torch.Tensor:
        """Return the compressed ``value`` used in this forward pass (must keep autograd)."""

    def bake(self, module: nn.Module, value: torch.Tensor) -> torch.Tensor:
        """Return the value to write into the parameter when unwrapping with ``bake=True``."""


class ModuleWrapper:
    """Bookkeeping and forward hooks for one wrapped module."""

    def __init__(self, module_name: str) -> None:
        self.module_name = module_name
        self.targets: dict[str, TargetRef] = {}
        self.handlers: dict[str, dict[str, Handler]] = {}
        self.owners: dict[tuple[str, str], str] = {}
        """(target, kind) -> label of the compressor that configured it."""
        self.state_names: list[str] = []
        # A stack, not a slot: a module may be re-entered (shared or recursive modules).
        self._saved: list[list[tuple[dict[str, Any], str, Any]]] = []

    # -- registration ----------------------------------------------------------------------

    def owner(self, target: str, kind: str) -> str | None:
        return self.owners.get((target, kind))

    def add(self, ref: TargetRef, kind: str, handler: Handler, owner: str) -> None:
        if (ref.name, kind) in self.owners:
            raise RuntimeError(f"{self.module_name}.{ref.name} already has a {kind} handler")
        self.targets[ref.name] = ref
        chain = {**self.handlers.get(ref.name, {}), kind: handler}
        # Kinds come from config.KINDS, all of which are in KIND_ORDER.
        self.handlers[ref.name] = {k: chain[k] for k in KIND_ORDER if k in chain}
        self.owners[(ref.name, kind)] = owner

    def remove(self, module: nn.Module, target: str, kind: str) -> None:
        self.handlers.get(target, {}).pop(kind, None)
        self.owners.pop((target, kind), None)
        prefix = f"{target}__{kind}_"
        for name in [n for n in self.state_names if n.startswith(prefix)]:
            self.drop_state(module, name)
        if not self.handlers.get(target):
            self.handlers.pop(target, None)
            self.targets.pop(target, None)

    def register_state(
        self,
        module: nn.Module,
        target: str,
        kind: str,
        name: str,
        value: torch.Tensor,
        *,
        trainable: bool = False,
        persistent: bool = True,
    ) -> str:
        """Register ``value`` on ``module`` for this target and kind; return its attribute name."""
        full = f"{target}__{kind}_{name}"
        if hasattr(module, full) and full not in self.state_names:
            raise RuntimeError(f"{self.module_name} already has an attribute '{full}'")
        if full in self.state_names:
            self.drop_state(module, full)
        if trainable:
            module.register_parameter(full, nn.Parameter(value))
        else:
            module.register_buffer(full, value, persistent=persistent)
        self.state_names.append(full)
        return full

    def drop_state(self, module: nn.Module, full: str) -> None:
        module._parameters.pop(full, None)
        module._buffers.pop(full, None)
        module._non_persistent_buffers_set.discard(full)
        if full in self.state_names:
            self.state_names.remove(full)

    # -- forward ---------------------------------------------------------------------------

    def _compress(self, module: nn.Module, target: str, value: torch.Tensor) -> torch.Tensor:
        for handler in self.handlers[target].values():
            value = handler(module, value)
        return value

    def _pre_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]):
        saved: list[tuple[dict[str, Any], str, Any]] = []
        # Re-entered from inside its own forward (a recursive module): the outer call already
        # put the compressed parameters in place; compressing them again would apply an 'add'
        # mask or a quantizer twice. Inputs and outputs differ per call and are still handled.
        reentered = bool(self._saved)
        try:
            for name, ref in self.targets.items():
                store: dict[str, Any]
                if ref.kind == "parameter":
                    store = cast(dict[str, Any], module._parameters)
                elif ref.kind == "buffer":
                    store = cast(dict[str, Any], module._buffers)
                elif ref.kind == "input":
                    value = get_input(ref, args, kwargs)
                    if isinstance(value, torch.Tensor):
                        args, kwargs = set_input(ref, args, kwargs, self._compress(module, name, value))
                    continue
                else:
                    continue
                if reentered:
                    continue
                original = store[name]
                saved.append((store, name, original))
                # A plain tensor in _parameters is what torch.func.functional_call does too:
                # attribute access returns it, and autograd flows back to the original.
                store[name] = self._compress(module, name, original)
        except BaseException:
            _restore(saved)
            raise
        self._saved.append(saved)
        return args, kwargs

    def _post_hook(self, module: nn.Module, args: Any, kwargs: Any, output: Any) -> Any:
        if self._saved:
            _restore(self._saved.pop())
        if output is None:
            return None
        for name, ref in self.targets.items():
            if ref.kind == "output":
                output = map_output(ref, output, functools.partial(self._compress, module, name))
        return output

    def _on_load_state_dict(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # Masks are stored compactly, so a saved mask may have another (broadcastable) shape
        # than the placeholder of a freshly wrapped module: adopt the saved shape.
        for full in self.state_names:
            incoming = state_dict.get(prefix + full)
            current = module._buffers.get(full)
            if isinstance(incoming, torch.Tensor) and current is not None and incoming.shape != current.shape:
                module._buffers[full] = torch.empty_like(incoming, device=current.device)

    # -- installation ----------------------------------------------------------------------

    def install(self, module: nn.Module) -> None:
        module.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        module.register_forward_hook(self._post_hook, with_kwargs=True, always_call=True)
        module.register_load_state_dict_pre_hook(self._on_load_state_dict)
        object.__setattr__(module, _ATTRIBUTE, self)

    def uninstall(self, module: nn.Module) -> None:
        # Hooks are found by identity, not by saved handles: a deep-copied model's handles
        # would point at the original model's hook dicts.
        for hooks in (module._forward_pre_hooks, module._forward_hooks, module._load_state_dict_pre_hooks):
            for hook_id, hook in list(hooks.items()):
                fn = getattr(hook, "hook", hook)
                if getattr(fn, "__self__", None) is self:
                    del hooks[hook_id]
                    module._forward_pre_hooks_with_kwargs.pop(hook_id, None)
                    module._forward_hooks_with_kwargs.pop(hook_id, None)
                    module._forward_hooks_always_called.pop(hook_id, None)
        for full in list(self.state_names):
            self.drop_state(module, full)
        module.__dict__.pop(_ATTRIBUTE, None)

    def bake(self, module: nn.Module) -> None:
        """Write the compressed value of every parameter/buffer target into the tensor in place."""
        with torch.no_grad():
            for name, ref in self.targets.items():
                if not ref.is_tensor_attribute:
                    continue
                tensor = getattr(module, name)
                value = tensor
                for handler in self.handlers[name].values():
                    value = handler.bake(module, value)
                tensor.copy_(value)


def _restore(saved: list[tuple[dict[str, Any], str, Any]]) -> None:
    for store, name, original in reversed(saved):
        store[name] = original


def get_wrapper(module: nn.Module) -> ModuleWrapper | None:
    return module.__dict__.get(_ATTRIBUTE)


def wrap(module: nn.Module, module_name: str) -> ModuleWrapper:
    """The module's wrapper, installed on first use."""
    wrapper = get_wrapper(module)
    if wrapper is None:
        wrapper = ModuleWrapper(module_name)
        wrapper.install(module)
    return wrapper


def wrappers(model: nn.Module) -> Iterator[tuple[str, nn.Module, ModuleWrapper]]:
    for name, module in model.named_modules():
        wrapper = get_wrapper(module)
        if wrapper is not None:
            yield name, module, wrapper


def unwrap(model: nn.Module, bake: bool = False) -> nn.Module:
    """Remove every wrapper from ``model`` and return it.

    With ``bake=False`` the model's state_dict is bitwise what it was before compression
    (masks and quantization are dropped); with ``bake=True`` the compressed values of
    parameter and buffer targets are written into the tensors in place, which keep their
    identity. Input/output compression cannot be baked and is dropped.
    """
    for _, module, wrapper in list(wrappers(model)):
        if bake:
            wrapper.bake(module)
        wrapper.uninstall(module)
    return model
