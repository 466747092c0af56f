"""The run file of ``compress run``: model, data, evaluation, steps and output, as attrs models.

A run file is YAML or JSON. It is structured with the project's strict cattrs converter, so an
unknown key or a bad value is a :class:`~compress_core.errors.ConfigError` naming its path
(``steps[1].epochs: must be an integer, got str 'ten'``). Each step's ``config_list`` and
``params`` are checked against the model by :func:`check_against_model` before anything runs,
with paths like ``steps[1].config_list[0].sparse_ratio``. See ``docs/run.md``.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import attrs

from .config import SettingError, field_names, read_data_file, structure_setting
from .errors import ConfigError

__all__ = [
    "DEVICES",
    "LOSSES",
    "STEP_KINDS",
    "TRAINING_KEYS",
    "DistillStep",
    "ExportStep",
    "FactorySpec",
    "PruneStep",
    "QuantizeStep",
    "RunFile",
    "TrainStep",
    "load_runfile",
    "parse_runfile",
]


DEFAULT_LR = 1e-3
"""Adam learning rate of every training step that does not set ``lr``."""


def _positive(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and value <= 0:
        raise SettingError(attribute.name, f"must be positive, got {value!r}")


def _factory_path(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    module, sep, attr = value.rpartition(":")
    if not sep or not module or not attr:
        raise SettingError(
            attribute.name, f"expected MODULE:FACTORY or FILE.py:FACTORY, got {value!r}"
        )


LOSSES = ("cross_entropy", "mse", "cosine")
"""Built-in loss names; any other loss is an import path ``MODULE:FUNCTION``."""

DEVICES = ("auto", "cpu", "cuda")
"""Values of the run file's ``device``."""


def _loss(instance: Any, attribute: attrs.Attribute, value: str | None) -> None:
    if value is None or value in LOSSES:
        return
    module, sep, attr = value.rpartition(":")
    if sep and module and attr:
        return  # an import path: resolved (and its errors reported) before the model is built
    close = difflib.get_close_matches(value, list(LOSSES), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise SettingError(
        attribute.name,
        f"unknown loss {value!r}{hint}; built-in losses: {', '.join(LOSSES)}, "
        "or MODULE:FUNCTION / FILE.py:FUNCTION",
    )


def _device(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if value not in DEVICES:
        close = difflib.get_close_matches(str(value), list(DEVICES), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise SettingError(
            attribute.name, f"must be one of {', '.join(DEVICES)}; got {value!r}{hint}"
        )


@attrs.frozen(kw_only=True)
class FactorySpec:
    """A callable named by import path, and the keyword arguments to call it with."""

    factory: str = attrs.field(validator=_factory_path)
    """``package.module:function`` or ``file.py:function`` (relative to the run file)."""
    kwargs: Dict[str, Any] = attrs.field(factory=dict)
    """Keyword arguments of the call."""


@attrs.frozen(kw_only=True)
class TrainStep:
    """Fine-tune the current model on the training data (the run's ``loss``, Adam)."""

    name: Optional[str] = None
    """Stage name in the report; default ``train``."""
    epochs: int = attrs.field(default=1, validator=_positive)
    """Passes over the training data."""
    lr: float = attrs.field(default=DEFAULT_LR, validator=_positive)
    """Adam learning rate."""
    max_batches: Optional[int] = attrs.field(default=None, validator=_positive)
    """Stop each epoch after this many batches (quick runs)."""
    loss: Optional[str] = attrs.field(default=None, validator=_loss)
    """Overrides the run file's ``loss`` for this step."""
    cache: bool = False
    """Keep the trained weights in ``<output>/cache/`` and reuse them on a later run whose
    model, data, seed and steps up to this one are the same (only before any prune step)."""


@attrs.frozen(kw_only=True)
class PruneStep:
    """Prune with a pruning method, then (``speedup``) make the model physically smaller."""

    name: Optional[str] = None
    """Stage name in the report; default ``prune``."""
    method: str
    """A pruning method (``l1_norm``, ``fpgm``, ... see ``compress plugins``)."""
    params: Dict[str, Any] = attrs.field(factory=dict)
    """The method's keyword parameters."""
    config_list: Tuple[Dict[str, Any], ...]
    """The pruning config list."""
    auto_dependency: bool = False
    """Run ``auto_set_dependency_group_ids`` on the config list first (coupled layers)."""
    speedup: bool = True
    """Replace the masked model with the physically smaller one (``compress_core.speedup``)."""
    epochs: Optional[int] = attrs.field(default=None, validator=_positive)
    """Train with the method attached for this many passes before the masks are computed
    (methods that learn from gradients: ``taylor``, ``movement``, ``slim``, schedules).
    Default: no training."""
    lr: Optional[float] = attrs.field(default=None, validator=_positive)
    """Adam learning rate of that training; default 0.001."""
    max_batches: Optional[int] = attrs.field(default=None, validator=_positive)
    """Stop each epoch after this many batches."""
    loss: Optional[str] = attrs.field(default=None, validator=_loss)
    """Overrides the run file's ``loss`` for this step's training."""


@attrs.frozen(kw_only=True)
class DistillStep:
    """Fine-tune with a distillation loss from the teacher (the model before the first prune)."""

    name: Optional[str] = None
    """Stage name in the report; default ``distill``."""
    method: str = "dynamic_layerwise"
    """A distillation method."""
    params: Dict[str, Any] = attrs.field(factory=dict)
    """The method's keyword parameters other than ``teacher`` (``origin_loss_lambda``, ...)."""
    config_list: Tuple[Dict[str, Any], ...]
    """The distillation config list (student modules and links to the teacher's)."""
    epochs: int = attrs.field(default=1, validator=_positive)
    """Passes over the training data."""
    lr: float = attrs.field(default=DEFAULT_LR, validator=_positive)
    """Adam learning rate."""
    max_batches: Optional[int] = attrs.field(default=None, validator=_positive)
    """Stop each epoch after this many batches."""
    loss: Optional[str] = attrs.field(default=None, validator=_loss)
    """Overrides the run file's ``loss`` as the task loss (weighted by ``origin_loss_lambda``)."""


@attrs.frozen(kw_only=True)
class QuantizeStep:
    """Attach a quantization method, optionally train with it (QAT), calibrate, freeze."""

    name: Optional[str] = None
    """Stage name in the report; default ``quantize``."""
    method: str = "ptq"
    """A quantization method; those that need training (``qat``, ``lsq``, ...) need ``epochs``."""
    params: Dict[str, Any] = attrs.field(factory=dict)
    """The method's keyword parameters (``observer``, ...)."""
    config_list: Tuple[Dict[str, Any], ...]
    """The quantization config list."""
    calibration_batches: int = attrs.field(default=8, validator=_positive)
    """Training batches run through the model (eval mode, after any training) to observe
    activation ranges."""
    epochs: Optional[int] = attrs.field(default=None, validator=_positive)
    """Quantization-aware training: passes over the training data with the method attached.
    Default: no training (post-training quantization)."""
    lr: Optional[float] = attrs.field(default=None, validator=_positive)
    """Adam learning rate of that training; default 0.001."""
    max_batches: Optional[int] = attrs.field(default=None, validator=_positive)
    """Stop each epoch after this many batches."""
    loss: Optional[str] = attrs.field(default=None, validator=_loss)
    """Overrides the run file's ``loss`` for this step's training."""


@attrs.frozen(kw_only=True)
class ExportStep:
    """Export the current (quantized) model."""

    name: Optional[str] = None
    """Stage name in the report; default ``export``."""
    format: str = attrs.field(default="onnx")
    """Only ``onnx`` (QDQ, run by onnxruntime with int8 kernels)."""

    @format.validator
    def _check_format(self, attribute: attrs.Attribute, value: str) -> None:
        if value != "onnx":
            raise SettingError(attribute.name, f"must be 'onnx', got {value!r}")


STEP_KINDS: dict[str, type] = {
    "train": TrainStep,
    "prune": PruneStep,
    "distill": DistillStep,
    "quantize": QuantizeStep,
    "export": ExportStep,
}
"""Step ``kind`` -> its settings class. ``prune``/``distill``/``quantize`` take methods of the
plugin kinds ``pruning``/``distillation``/``quantization``."""

METHOD_KIND = {PruneStep: "pruning", DistillStep: "distillation", QuantizeStep: "quantization"}

Step = Any  # one of the STEP_KINDS classes


@attrs.frozen(kw_only=True)
class RunFile:
    """A whole run: what to compress, on what data, how, and where the results go."""

    model: FactorySpec
    """Factory of the (untrained or pre-trained) model; a string is ``{factory: ...}``."""
    data: FactorySpec
    """Factory returning ``(train, eval)``: re-iterable batches of ``(inputs, labels)``."""
    evaluate: Optional[str] = None
    """``MODULE:FUNCTION`` called as ``fn(model, eval_batches) -> float``; default top-1
    accuracy in percent."""
    metric: str = "accuracy (%)"
    """Name of the evaluation number in the report."""
    loss: str = attrs.field(default="cross_entropy", validator=_loss)
    """Training loss of every step that trains (a step's ``loss`` overrides it):
    ``cross_entropy``, ``mse``, ``cosine`` (1 - cosine similarity along the last dim, mean over
    the batch) or ``MODULE:FUNCTION`` / ``FILE.py:FUNCTION`` called as
    ``fn(outputs, labels) -> scalar tensor``."""
    device: str = attrs.field(default="auto", validator=_device)
    """``auto`` (``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``), ``cpu`` or ``cuda``;
    the process group of a ``torchrun`` launch is NCCL on CUDA and gloo on the CPU."""
    output: str
    """Output folder (relative to the current directory); replaced only by a finished run."""
    seed: int = 0
    """Seed of torch's generator at the start of the run."""
    latency_runs: int = attrs.field(default=7, validator=_positive)
    """Timed forward passes per latency figure (the median is reported)."""
    steps: Tuple[Dict[str, Any], ...]
    """The steps, in order; each a mapping with ``kind`` (see :data:`STEP_KINDS`)."""
    base_dir: str = "."
    """Folder of the run file; relative ``FILE.py:FACTORY`` paths are resolved from it."""

    def parsed_steps(self) -> list[Step]:
        return [_structure_step(raw, i) for i, raw in enumerate(self.steps)]


def _structure_step(raw: Any, index: int) -> Step:
    where = f"steps[{index}]"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"must be a mapping with 'kind', got {type(raw).__name__}", key=where)
    kind = raw.get("kind")
    if kind not in STEP_KINDS:
        known = ", ".join(STEP_KINDS)
        close = difflib.get_close_matches(str(kind), list(STEP_KINDS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        got = "missing" if kind is None else f"got {kind!r}"
        raise ConfigError(f"'kind' must be one of {known}; {got}{hint}", key=f"{where}.kind")
    rest = {k: v for k, v in raw.items() if k != "kind"}
    _check_keys(rest, STEP_KINDS[kind], where, extra=("kind",))
    try:
        return structure_setting(rest, STEP_KINDS[kind], entry=None)
    except ConfigError as exc:
        raise ConfigError(exc.reason, key=f"{where}.{exc.key}" if exc.key else where) from None


def parse_runfile(data: Any, *, base_dir: str | Path = ".") -> RunFile:
    """Structure a loaded run file (a mapping) into a :class:`RunFile`; errors name their path."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"a run file must be a mapping, got {type(data).__name__}")
    data = dict(data)
    for key in ("model", "data"):
        if isinstance(data.get(key), str):
            data[key] = {"factory": data[key]}
    _check_keys(data, RunFile, None, hidden=("base_dir",))
    data["base_dir"] = str(base_dir)
    try:
        runfile = structure_setting(data, RunFile, entry=None)
    except ConfigError as exc:
        raise ConfigError(exc.reason, key=exc.key) from None
    if not runfile.steps:
        raise ConfigError("a run needs at least one step", key="steps")
    steps = runfile.parsed_steps()
    _check_training_keys(steps)
    _check_order(steps)
    return runfile


def _check_keys(
    data: Mapping[str, Any],
    cls: type,
    where: str | None,
    extra: tuple[str, ...] = (),
    hidden: tuple[str, ...] = (),
) -> None:
    # Checked here rather than by cattrs so that the error names the unknown key's own path.
    known = [k for k in field_names(cls) if k not in hidden] + list(extra)
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1) if isinstance(key, str) else []
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            path = f"{where}.{key}" if where else str(key)
            raise ConfigError(
                f"unknown key {key!r}{hint}; known keys: {', '.join(known)}", key=path
            )


TRAINING_KEYS = ("lr", "max_batches", "loss")
"""Keys of prune and quantize steps that only mean something together with ``epochs``."""


def _check_training_keys(steps: list[Step]) -> None:
    for i, step in enumerate(steps):
        if isinstance(step, (PruneStep, QuantizeStep)) and step.epochs is None:
            for key in TRAINING_KEYS:
                if getattr(step, key) is not None:
                    raise ConfigError(
                        f"'{key}' applies to the training of this step, which needs 'epochs'",
                        key=f"steps[{i}].{key}",
                    )


def _check_order(steps: list[Step]) -> None:
    seen_prune = False
    seen_quantize = False
    for i, step in enumerate(steps):
        if isinstance(step, TrainStep) and step.cache and seen_prune:
            raise ConfigError(
                "only training before the first prune step can be cached", key=f"steps[{i}].cache"
            )
        if isinstance(step, (TrainStep, DistillStep, PruneStep)) and seen_quantize:
            raise ConfigError(
                "training and pruning after quantization is not supported; put quantize last (before export)",
                key=f"steps[{i}]",
            )
        if isinstance(step, PruneStep):
            seen_prune = True
        if isinstance(step, QuantizeStep):
            if seen_quantize:
                raise ConfigError("only one quantize step per run", key=f"steps[{i}]")
            seen_quantize = True
        if (
            isinstance(step, DistillStep)
            and not seen_prune
            and not any(isinstance(s, TrainStep) for s in steps[:i])
        ):
            raise ConfigError(
                "a distill step needs a teacher: a train or prune step before it", key=f"steps[{i}]"
            )


def load_runfile(path: str | Path) -> RunFile:
    """Read and structure a YAML/JSON run file.

    :raises ConfigError: unreadable or unparsable file, unknown keys, bad values.
    """
    path = Path(path)
    return parse_runfile(read_data_file(path), base_dir=path.resolve().parent)
