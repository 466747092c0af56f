"""The layer-wise distillation base: student recording, the teacher run, the loss per target.

How a step works (the design's "the teacher runs on the student's own forward inputs"):

1. A forward pre-hook on the student's root module (the model given to ``create``) keeps a
   reference to the arguments of each outermost call. It is registered with ``prepend=True``,
   so it sees the user's inputs before any compression of the root's own inputs. Under
   ``DistributedDataParallel`` the wrapper calls ``model.module(...)``, i.e. the user's module,
   so the hook fires there too.
2. While the student runs, a handler per configured target (the wrapper calls it after mask
   and quantization) keeps the target's value, with its autograd graph.
3. The teacher runs **lazily**, on the first :meth:`loss` (or :meth:`compress`) after a student
   forward, under ``torch.no_grad()`` and in eval mode (each module's ``training`` flag is
   restored afterwards). Its targets are captured by hooks that exist only during that run,
   so the teacher carries no hooks, no state and no changed flags between steps; forwards
   without a ``loss()`` (validation) cost no teacher run. The result is cached until the next
   student forward.

``teacher_predict(teacher, *args, **kwargs)`` replaces the default ``teacher(*args, **kwargs)``
when the teacher needs other inputs than the student; it runs under the same ``no_grad`` and
eval mode, and only its hooks' captures matter (its return value is ignored).
"""

from __future__ import annotations

import copy
import difflib
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import attrs
import torch
from torch import nn

from compress_core import CompressError, Compressor, ConfigError, TargetRecord
from compress_core.config import SettingError
from compress_core.targets import TargetRef, get_input, get_output, resolve_target
from compress_core.wrapper import ModuleWrapper, get_wrapper

from .losses import distil_loss

__all__ = ["DistillerParams", "LayerwiseDistiller"]

Key = tuple[str, str]
"""(module name, canonical target name)."""


def _is_module(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, nn.Module):
        raise SettingError(attribute.name, f"must be an nn.Module (the trained teacher), got {type(value).__name__}")


def _callable_or_none(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and not callable(value):
        raise SettingError(
            attribute.name, f"must be a callable teacher_predict(teacher, *args, **kwargs), got {type(value).__name__}"
        )


def _finite(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if not math.isfinite(value):
        raise SettingError(attribute.name, f"must be a finite number, got {value!r}")


def _tuple_or_none(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and not isinstance(value, tuple):
        raise SettingError(
            attribute.name,
            f"must be a tuple of positional arguments, e.g. (x,), got {type(value).__name__}",
        )


@attrs.frozen(kw_only=True)
class DistillerParams:
    """Keyword parameters of the layer-wise distillers."""

    teacher: Any = attrs.field(validator=_is_module)
    """The trained teacher; never modified (run under ``no_grad`` in eval mode, flags restored)."""
    teacher_predict: Any | None = attrs.field(default=None, validator=_callable_or_none)
    """``teacher_predict(teacher, *args, **kwargs)`` runs the teacher on the student's forward
    arguments; default: ``teacher(*args, **kwargs)``."""
    origin_loss_lambda: float = attrs.field(default=1.0, validator=_finite)
    """Weight of the task loss in :meth:`LayerwiseDistiller.total_loss`."""
    example_inputs: Any | None = attrs.field(default=None, validator=_tuple_or_none)
    """A tuple of positional arguments of the student. When given, student and teacher run on
    it once at ``create`` (no_grad, eval mode) to check target shapes before anything is
    touched; ``adaptive1d_layerwise`` needs it to size its adapters."""


class _Inert:
    """Copies of a hook are inert: a deep-copied or pickled student is not distilled by the
    original compressor (whose recorded tensors hold autograd graphs that cannot be copied)."""

    owner: LayerwiseDistiller | None

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        copied = copy.copy(self)
        copied.owner = None
        return copied

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "owner": None}


class RecordHandler(_Inert):
    """Keeps the value of one student target (with its graph) for the loss of this step."""

    def __init__(self, owner: LayerwiseDistiller, key: Key) -> None:
        self.owner = owner
        self.key = key

    def __call__(self, module: nn.Module, value: torch.Tensor) -> torch.Tensor:
        if self.owner is not None:
            self.owner._record(self.key, value)
        return value

    def bake(self, module: nn.Module, value: torch.Tensor) -> torch.Tensor:
        return value


class _RootHook(_Inert):
    def __init__(self, owner: LayerwiseDistiller, after: bool) -> None:
        self.owner = owner
        self.after = after

    def __call__(self, *args: Any) -> None:
        if self.owner is not None:
            if self.after:
                self.owner._after_student_call(*args)
            else:
                self.owner._on_student_call(*args)


class LayerwiseDistiller(Compressor):
    """Base of the layer-wise distillers: one loss per configured student target.

    Subclasses decide how several links combine (:meth:`combine`), whether a target may have
    several links (:attr:`single_link`) and how shapes are matched (:meth:`check_shapes`,
    :meth:`adapt`).
    """

    kind: ClassVar[str] = "distillation"
    params_cls: ClassVar[type | None] = DistillerParams
    single_link: ClassVar[bool] = False
    needs_example_inputs: ClassVar[bool] = False

    def __init__(self, model: nn.Module, records: list[TargetRecord], params: Any, *, method: str) -> None:
        super().__init__(model, records, params, method=method)
        self.teacher: nn.Module = params.teacher
        self.origin_loss_lambda: float = params.origin_loss_lambda
        self._teacher_modules = dict(self.teacher.named_modules())
        self._links: dict[Key, tuple[tuple[str, TargetRef], ...]] = {}
        self._handlers: dict[Key, RecordHandler] = {}
        self._student: dict[Key, torch.Tensor] = {}
        self._teacher_values: dict[Key, torch.Tensor] | None = None
        self._inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        self._calls: list[bool] = []
        self._running_teacher = False
        self._root_hooks: list[Any] = []

    # -- validation (before the model is touched) -------------------------------------------

    def validate(self) -> None:
        if self.teacher is self.model:
            raise ConfigError(
                "the teacher must be a separate model (e.g. a copy made before compressing the student)",
                key="teacher",
            )
        if self.needs_example_inputs and self.params.example_inputs is None:
            raise ConfigError(
                f"'{self.method}' needs example_inputs (a tuple of positional arguments of the "
                "student) to learn the target shapes at create time",
                key="example_inputs",
            )
        for record in self.records:
            self._links[(record.module_name, record.target_name)] = self._resolve_links(record)
        if self.params.example_inputs is not None:
            student = self._trace_student(self.params.example_inputs)
            teacher = self._run_teacher(self.params.example_inputs, {})
            for record in self.records:
                key = (record.module_name, record.target_name)
                if key not in student:
                    raise ConfigError(
                        f"target '{record.target_name}' produced no tensor when the student ran on example_inputs",
                        entry=record.entry,
                        key="target_names",
                        module=record.module_name,
                    )
                shapes = []
                for link, ref in self._links[key]:
                    value = teacher.get((link, ref.name))
                    if value is None:
                        raise ConfigError(
                            f"teacher module '{link}' produced no tensor '{ref.name}' when the teacher "
                            "ran on example_inputs",
                            entry=record.entry,
                            key="link",
                            module=record.module_name,
                        )
                    shapes.append((link, tuple(value.shape)))
                self.check_shapes(record, student[key], shapes)

    def _resolve_links(self, record: TargetRecord) -> tuple[tuple[str, TargetRef], ...]:
        link = record.settings.link
        names = (record.module_name,) if link is None else ((link,) if isinstance(link, str) else tuple(link))

        def error(reason: str) -> ConfigError:
            return ConfigError(reason, entry=record.entry, key="link", module=record.module_name)

        if self.single_link and len(names) != 1:
            raise error(f"'{self.method}' takes one link per target, got {len(names)}: {list(names)}")
        resolved = []
        for name in names:
            teacher_module = self._teacher_modules.get(name)
            if teacher_module is None:
                close = difflib.get_close_matches(name, list(self._teacher_modules), n=1)
                hint = f" (closest: '{close[0]}')" if close else ""
                default = " (the default link is the student module's own name; set 'link')" if link is None else ""
                raise error(f"the teacher has no module '{name}'{hint}{default}")
            try:
                ref = resolve_target(teacher_module, record.target_name)
            except ValueError as exc:
                raise error(f"target '{record.target_name}' of teacher module '{name}': {exc}") from None
            resolved.append((name, ref))
        return tuple(resolved)

    def check_shapes(
        self, record: TargetRecord, student: torch.Tensor, teachers: list[tuple[str, tuple[int, ...]]]
    ) -> None:
        """Raise ``ConfigError`` when the traced student target cannot be compared with its links."""
        for name, shape in teachers:
            if tuple(student.shape) != shape:
                raise ConfigError(
                    f"student target '{record.target_name}' has shape {list(student.shape)} but teacher "
                    f"'{name}'.{record.target_name} has shape {list(shape)}; adaptive1d_layerwise adapts a "
                    "differing last dimension",
                    entry=record.entry,
                    key="link",
                    module=record.module_name,
                )

    # -- attaching ----------------------------------------------------------------------------

    def make_handler(self, module: nn.Module, wrapper: ModuleWrapper, record: TargetRecord) -> RecordHandler:
        if not self._root_hooks:
            self._install_root_hooks()
        key = (record.module_name, record.target_name)
        handler = RecordHandler(self, key)
        self._handlers[key] = handler
        return handler

    def _install_root_hooks(self) -> None:
        self._root_hooks = [
            self.model.register_forward_pre_hook(_RootHook(self, after=False), with_kwargs=True, prepend=True),
            self.model.register_forward_hook(_RootHook(self, after=True), always_call=True),
        ]

    def close(self) -> None:
        """Remove the hooks on the student's root module; the distiller records nothing after.

        ``compress_core.unwrap(model)`` removes the target handlers; the root hooks then also
        remove themselves on the next forward.
        """
        for handle in self._root_hooks:
            handle.remove()
        self._root_hooks = []
        self._calls.clear()

    def _attached(self) -> bool:
        modules = dict(self.model.named_modules())
        for key, handler in self._handlers.items():
            module = modules.get(key[0])
            wrapper = get_wrapper(module) if module is not None else None
            if wrapper is not None and wrapper.handlers.get(key[1], {}).get(self.kind) is handler:
                return True
        return False

    # -- the student's forward ------------------------------------------------------------

    def _on_student_call(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._running_teacher:
            return
        outermost = not self._calls
        self._calls.append(outermost)
        if outermost:
            if not self._attached():
                self._calls.pop()
                self.close()
                return
            self._inputs = (args, dict(kwargs))
            self._student.clear()
            self._teacher_values = None
        return

    def _after_student_call(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._running_teacher:
            return
        if self._calls:
            self._calls.pop()
        return

    def _record(self, key: Key, value: torch.Tensor) -> None:
        if self._running_teacher:
            return  # a module shared by teacher and student: only the student's call counts
        self._student[key] = self.adapt(key, value)

    def adapt(self, key: Key, value: torch.Tensor) -> torch.Tensor:
        """Map a student value to the teacher's space before the loss (identity here)."""
        return value

    # -- running a model with capture hooks --------------------------------------------------

    def _teacher_targets(self) -> dict[str, list[TargetRef]]:
        wanted: dict[str, list[TargetRef]] = {}
        for links in self._links.values():
            for name, ref in links:
                refs = wanted.setdefault(name, [])
                if ref not in refs:
                    refs.append(ref)
        return wanted

    def _run_teacher(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[Key, torch.Tensor]:
        predict: Callable[..., Any] | None = self.params.teacher_predict
        teacher = self.teacher

        def call() -> None:
            if predict is None:
                teacher(*args, **kwargs)
            else:
                predict(teacher, *args, **kwargs)

        self._running_teacher = True
        try:
            return _capture(teacher, self._teacher_modules, self._teacher_targets(), call)
        finally:
            self._running_teacher = False

    def _trace_student(self, example_inputs: tuple[Any, ...]) -> dict[Key, torch.Tensor]:
        wanted: dict[str, list[TargetRef]] = {}
        for record in self.records:
            wanted.setdefault(record.module_name, []).append(record.target)
        return _capture(self.model, dict(self.model.named_modules()), wanted, lambda: self.model(*example_inputs))

    def teacher_values(self) -> dict[Key, torch.Tensor]:
        """The teacher's values of every linked target for the last student forward."""
        if self._teacher_values is None:
            if self._inputs is None:
                raise CompressError(
                    f"'{self.method}': the student has not run since create; call the model before loss()"
                )
            args, kwargs = self._inputs
            values = self._run_teacher(args, kwargs)
            for module_name, refs in self._teacher_targets().items():
                for ref in refs:
                    if (module_name, ref.name) not in values:
                        raise CompressError(
                            f"'{self.method}': teacher module '{module_name}' produced no tensor "
                            f"'{ref.name}' in the teacher's run (was it called?)"
                        )
            self._teacher_values = values
        return self._teacher_values

    # -- losses -------------------------------------------------------------------------------

    def combine(self, losses: list[torch.Tensor]) -> torch.Tensor:
        """One loss from the per-link losses of a target."""
        raise NotImplementedError

    def target_losses(self) -> dict[Key, torch.Tensor]:
        """``lambda * loss`` of every configured target for the last student forward."""
        teacher = self.teacher_values()
        terms: dict[Key, torch.Tensor] = {}
        for record in self.records:
            key = (record.module_name, record.target_name)
            student = self._student.get(key)
            if student is None:
                raise CompressError(
                    f"'{self.method}': student module '{record.module_name}' produced no "
                    f"'{record.target_name}' in the last forward (was it called?)"
                )
            losses = []
            for name, ref in self._links[key]:
                value = teacher[(name, ref.name)].to(device=student.device)
                if value.shape != student.shape:
                    raise CompressError(
                        f"'{self.method}': student '{record.module_name}'.{record.target_name} has shape "
                        f"{list(student.shape)}, teacher '{name}'.{ref.name} has {list(value.shape)}"
                    )
                losses.append(distil_loss(record.settings.apply_method, student, value))
            terms[key] = record.settings.lambda_ * self.combine(losses)
        return terms

    def loss(self) -> torch.Tensor:
        """``sum(lambda * loss)`` over the configured targets, for the last student forward."""
        terms = self.target_losses()
        total = torch.zeros((), device=next(iter(terms.values())).device) if terms else super().loss()
        for term in terms.values():
            total = total + term
        return total

    def total_loss(self, task_loss: torch.Tensor) -> torch.Tensor:
        """``origin_loss_lambda * task_loss + loss()``: the whole objective of a step."""
        return self.origin_loss_lambda * task_loss + self.loss()

    def compress(self) -> dict[str, dict[str, torch.Tensor]]:
        """The last step's ``lambda * loss`` per target, ``{module: {target: scalar}}`` (detached).

        Empty before the first student forward.
        """
        if self._inputs is None:
            return {}
        result: dict[str, dict[str, torch.Tensor]] = {}
        for (module_name, target), value in self.target_losses().items():
            result.setdefault(module_name, {})[target] = value.detach()
        return result


def _capture(
    root: nn.Module,
    modules: Mapping[str, nn.Module],
    wanted: Mapping[str, list[TargetRef]],
    call: Callable[[], Any],
) -> dict[Key, torch.Tensor]:
    """Run ``call`` (which runs ``root``) under no_grad in eval mode and capture ``wanted``.

    The hooks exist only during the call; every module's ``training`` flag is restored.
    Parameters and buffers are read after the call. The last call of a module wins.
    """
    captured: dict[Key, torch.Tensor] = {}
    handles = []
    for name, refs in wanted.items():
        module = modules[name]
        inputs = [r for r in refs if r.kind == "input"]
        outputs = [r for r in refs if r.kind == "output"]
        if inputs:
            def pre(mod: nn.Module, args: Any, kwargs: Any, name: str = name, refs: list = inputs) -> None:
                for ref in refs:
                    value = get_input(ref, args, kwargs)
                    if isinstance(value, torch.Tensor):
                        captured[(name, ref.name)] = value.detach()

            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        if outputs:
            def post(mod: nn.Module, args: Any, output: Any, name: str = name, refs: list = outputs) -> None:
                for ref in refs:
                    value = get_output(ref, output)
                    if value is not None:
                        captured[(name, ref.name)] = value.detach()

            handles.append(module.register_forward_hook(post))
    flags = [(m, m.training) for m in root.modules()]
    try:
        root.eval()
        with torch.no_grad():
            call()
    finally:
        for handle in handles:
            handle.remove()
        for module, training in flags:
            module.training = training
    for name, refs in wanted.items():
        for ref in refs:
            if ref.is_tensor_attribute:
                captured[(name, ref.name)] = getattr(modules[name], ref.name).detach()
    return captured
