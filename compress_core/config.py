"""The config language of ``../shared/spec/compression-config-spec.rst`` as attrs models.

A config entry is structured in two passes: first the eight common keys (module selection,
``target_names``, ``target_settings``) and the kind's entry-level keys (``fuse_names``), then,
once the targets of each selected module are known, each target's merged settings into the
settings class of the method (``PruningSetting`` or a plugin's subclass of it, ...).

Validation errors become :class:`~compress_core.errors.ConfigError` whose text names the entry
and the key path, e.g. ``config_list[1].target_settings.weight.sparse_ratio: must be within
[0, 1], got 1.5``.
"""

from __future__ import annotations

import difflib
import functools
import json
import math
import operator
import os
import re
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple, Union

import attrs
import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError
from cattrs.gen import make_dict_structure_fn, override

from .errors import ConfigError

__all__ = [
    "COMMON_KEYS",
    "KINDS",
    "AlignSetting",
    "DistillationSetting",
    "EntryCommon",
    "Kind",
    "PruningSetting",
    "QuantizationSetting",
    "SettingError",
    "converter",
    "int_at_least",
    "structure_setting",
]

COMMON_KEYS = (
    "op_names",
    "op_names_re",
    "op_types",
    "exclude_op_names",
    "exclude_op_names_re",
    "exclude_op_types",
    "target_names",
    "target_settings",
)


class SettingError(ValueError):
    """Raised by validators; carries the field name so the error path can name the key."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(message)


# -- field validators ---------------------------------------------------------------------


def _unit_interval(instance: Any, attribute: attrs.Attribute, value: float | None) -> None:
    if value is not None and not 0.0 <= value <= 1.0:
        raise SettingError(attribute.name, f"must be within [0, 1], got {value!r}")


def _finite(instance: Any, attribute: attrs.Attribute, value: float | None) -> None:
    if value is not None and not math.isfinite(value):
        raise SettingError(attribute.name, f"must be a finite number, got {value!r}")


def _one_of(*choices: str):
    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is not None and value not in choices:
            options = ", ".join(repr(c) for c in choices)
            raise SettingError(attribute.name, f"must be one of {options}, got {value!r}")

    return check


def int_at_least(minimum: int):
    """A validator for plugins' parameter classes: an integer (not a bool) >= ``minimum``."""

    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise SettingError(attribute.name, f"must be an integer >= {minimum}, got {value!r}")

    return check


def _positive(instance: Any, attribute: attrs.Attribute, value: int | None) -> None:
    if value is not None and value <= 0:
        raise SettingError(attribute.name, f"must be a positive integer, got {value!r}")


def _valid_regexes(instance: Any, attribute: attrs.Attribute, value: tuple[str, ...] | None) -> None:
    for pattern in value or ():
        try:
            re.compile(pattern)
        except (re.error, OverflowError, RecursionError) as exc:  # 'a{4294967296}' overflows
            raise SettingError(attribute.name, f"invalid regular expression {pattern!r}: {exc}") from None


# Type aliases with their own strict structure hooks (see `_make_converter`).
GroupId = Union[str, int]
Granularity = Union[str, Tuple[int, ...]]
Link = Union[str, Tuple[str, ...]]
TargetSettings = Dict[str, Dict[str, Any]]


# -- the common keys ------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class EntryCommon:
    """The eight common keys of a config entry."""

    op_names: Optional[Tuple[str, ...]] = None
    """Fully qualified module names; names that match no module are ignored with a warning."""
    op_names_re: Optional[Tuple[str, ...]] = attrs.field(default=None, validator=_valid_regexes)
    """Regular expressions matched against module names with ``re.match``."""
    op_types: Optional[Tuple[str, ...]] = None
    """Module class names (``Linear``) or qualified names (``torch.nn.Linear``)."""
    exclude_op_names: Optional[Tuple[str, ...]] = None
    """Module names removed from the selection."""
    exclude_op_names_re: Optional[Tuple[str, ...]] = attrs.field(default=None, validator=_valid_regexes)
    """Regular expressions (``re.match``) whose matches are removed from the selection."""
    exclude_op_types: Optional[Tuple[str, ...]] = None
    """Module types removed from the selection."""
    target_names: Optional[Tuple[str, ...]] = None
    """Targets to compress on each selected module; default: the kind's defaults for its type."""
    target_settings: Optional[TargetSettings] = None
    """Per-target settings that override the shorthand keys and may add targets."""

    def __attrs_post_init__(self) -> None:
        if self.op_names is None and self.op_names_re is None and self.op_types is None:
            raise SettingError(
                "op_names", "an entry needs at least one of op_names, op_names_re, op_types"
            )


# -- target settings per kind ---------------------------------------------------------------


@attrs.frozen(kw_only=True)
class AlignSetting:
    """Derive this target's mask from another target's mask instead of from a metric."""

    module_name: Optional[str] = None
    """Module holding the source target; default: the configured module itself."""
    target_name: str
    """The source target on that module."""
    dims: Tuple[int, ...]
    """Dimensions of the source whose positions the target's positions correspond to."""


def _check_pruning(setting: PruningSetting) -> None:
    if setting.sparse_ratio is not None and setting.sparse_threshold is not None:
        raise SettingError(
            "sparse_threshold", "set either sparse_ratio or sparse_threshold, not both"
        )
    if (
        setting.min_sparse_ratio is not None
        and setting.max_sparse_ratio is not None
        and setting.min_sparse_ratio > setting.max_sparse_ratio
    ):
        raise SettingError(
            "min_sparse_ratio",
            f"must not exceed max_sparse_ratio ({setting.min_sparse_ratio} > "
            f"{setting.max_sparse_ratio})",
        )
    if setting.global_group_id is not None and setting.sparse_ratio is None:
        raise SettingError("global_group_id", "a global group needs sparse_ratio")
    if setting.align is not None and (
        setting.sparse_ratio is not None or setting.sparse_threshold is not None
    ):
        raise SettingError(
            "align", "an aligned target takes its mask from the source; drop sparse_ratio/sparse_threshold"
        )
    if isinstance(setting.granularity, str) and setting.granularity not in PRUNING_GRANULARITIES:
        options = ", ".join(repr(g) for g in PRUNING_GRANULARITIES)
        raise SettingError(
            "granularity", f"must be one of {options} or a list of integers, got {setting.granularity!r}"
        )


PRUNING_GRANULARITIES = ("default", "in_channel", "out_channel", "per_channel", "element")


@attrs.frozen(kw_only=True)
class PruningSetting:
    """Settings of one pruning target (spec: "Pruning Specific Configuration Keys")."""

    sparse_ratio: Optional[float] = attrs.field(default=None, validator=_unit_interval)
    """Fraction of the target (or of its global group) to mask: ``floor(n * ratio)`` positions."""
    max_sparse_ratio: Optional[float] = attrs.field(default=None, validator=_unit_interval)
    """Upper bound on this target's own sparsity (also inside a global group)."""
    min_sparse_ratio: Optional[float] = attrs.field(default=None, validator=_unit_interval)
    """Lower bound on this target's own sparsity (also inside a global group)."""
    sparse_threshold: Optional[float] = attrs.field(default=None, validator=_finite)
    """Mask positions whose metric is below this value (range depends on the method)."""
    global_group_id: Optional[GroupId] = None
    """Targets sharing this id are ranked together against one ``sparse_ratio``."""
    dependency_group_id: Optional[GroupId] = None
    """Targets sharing this id are pruned at identical positions (mean metric)."""
    granularity: Granularity = "default"
    """``default``, ``in_channel``, ``out_channel``, ``per_channel``, ``element`` or a block shape."""
    internal_metric_block: Optional[int] = attrs.field(default=None, validator=_positive)
    """Within a dependency group, prune whole chunks of this many channels (heads, groups)."""
    apply_method: str = attrs.field(default="mul", validator=_one_of("mul", "add"))
    """``mul`` multiplies by a 0/1 mask; ``add`` adds -1000 at masked positions."""
    align: Optional[AlignSetting] = None
    """Take the mask from another target instead of computing it."""

    def __attrs_post_init__(self) -> None:
        _check_pruning(self)


@attrs.frozen(kw_only=True)
class QuantizationSetting:
    """Settings of one quantization target (spec: "Quantization Specific Configuration Keys")."""

    quant_dtype: str = attrs.field(default="int8")
    """``intN`` or ``uintN`` with N in 1..8."""
    quant_scheme: Optional[str] = attrs.field(
        default=None, validator=_one_of("affine", "symmetric")
    )
    """``affine`` or ``symmetric``; ``None`` lets the quantizer choose."""
    granularity: Granularity = "default"
    """``default`` (per tensor), ``per_channel`` or a block shape."""

    @quant_dtype.validator
    def _check_dtype(self, attribute: attrs.Attribute, value: str) -> None:
        if not re.fullmatch(r"u?int[1-8]", value):
            raise SettingError(
                attribute.name, f"must be 'intN' or 'uintN' with N in 1..8, got {value!r}"
            )

    def __attrs_post_init__(self) -> None:
        if isinstance(self.granularity, str) and self.granularity not in ("default", "per_channel"):
            raise SettingError(
                "granularity",
                f"must be 'default', 'per_channel' or a list of integers, got {self.granularity!r}",
            )


@attrs.frozen(kw_only=True)
class DistillationSetting:
    """Settings of one distillation target (spec: "Distillation Specific Configuration Keys")."""

    lambda_: float = 1.0
    """Scale of this target's loss (written ``lambda`` in configs)."""
    link: Optional[Link] = None
    """Teacher module name(s) this target is compared with; default: the same name."""
    apply_method: str = attrs.field(default="mse", validator=_one_of("mse", "kl"))
    """``mse`` (mean squared error) or ``kl`` (the spec's temperature-2 KL divergence)."""


@attrs.frozen(kw_only=True)
class Kind:
    """A kind of compression: its settings class and its entry-level keys."""

    name: str
    setting_cls: type
    entry_keys: Mapping[str, Any] = attrs.field(factory=dict)
    """Keys that belong to the entry as a whole, not to a target, with their types."""
    overwrite: bool = False
    """Later entries overwrite earlier ones on the same target (quantization) instead of
    being ignored (configure-once)."""


KINDS: dict[str, Kind] = {
    "pruning": Kind(name="pruning", setting_cls=PruningSetting),
    "quantization": Kind(
        name="quantization",
        setting_cls=QuantizationSetting,
        entry_keys={"fuse_names": Tuple[Tuple[str, ...], ...]},
        overwrite=True,
    ),
    "distillation": Kind(name="distillation", setting_cls=DistillationSetting),
}


# -- the converter --------------------------------------------------------------------------


def _none_or(hook: Callable[[Any, Any], Any], value: Any, tp: Any) -> Any:
    return None if value is None else hook(value, tp)


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _make_converter() -> cattrs.Converter:
    # cattrs' default hooks coerce (str(5) -> '5', list('fc1') -> ['f', 'c', '1']); configs
    # are hand-written, so every primitive is checked strictly instead.
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)

    def structure_str(value: Any, _: type) -> str:
        if not isinstance(value, str):
            raise ValueError(f"must be a string, got {_describe(value)}")
        return value

    def structure_float(value: Any, _: type) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"must be a number, got {_describe(value)}")
        return float(value)

    def structure_int(value: Any, _: type) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer, got {_describe(value)}")
        return value

    def structure_group_id(value: Any, _: type) -> Hashable:
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise ValueError(f"must be a string or an integer, got {_describe(value)}")
        return value

    def structure_granularity(value: Any, _: type) -> str | tuple[int, ...]:
        if isinstance(value, str):
            return value
        if isinstance(value, (list, tuple)) and value and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            return tuple(value)
        raise ValueError(f"must be a granularity name or a list of integers, got {_describe(value)}")

    def structure_link(value: Any, _: type) -> str | tuple[str, ...]:
        if isinstance(value, str):
            return value
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ValueError(f"must be a module name or a list of module names, got {_describe(value)}")

    def structure_bool(value: Any, _: type) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, got {_describe(value)}")
        return value

    conv.register_structure_hook(str, structure_str)
    conv.register_structure_hook(float, structure_float)
    conv.register_structure_hook(int, structure_int)
    # bool subclasses int, so without its own hook it would dispatch to (and fail in) the int hook.
    conv.register_structure_hook(bool, structure_bool)
    for alias, hook in (
        (GroupId, structure_group_id),
        (Granularity, structure_granularity),
        (Link, structure_link),
    ):
        conv.register_structure_hook_func(functools.partial(operator.eq, alias), hook)
        conv.register_structure_hook_func(
            functools.partial(operator.eq, Optional[alias]), functools.partial(_none_or, hook)
        )

    def is_sequence(tp: Any) -> bool:
        return getattr(tp, "__origin__", None) in (tuple, list)

    def structure_sequence(value: Any, tp: Any) -> tuple[Any, ...]:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"must be a list, got {_describe(value)}")
        inner = tp.__args__[0]
        return tuple(conv.structure(item, inner) for item in value)

    conv.register_structure_hook_func(is_sequence, structure_sequence)

    def structure_target_settings(value: Any, _: Any) -> dict[str, dict[str, Any]]:
        if not isinstance(value, Mapping):
            raise ValueError(f"must be a mapping of target name to settings, got {_describe(value)}")
        result = {}
        for target, settings in value.items():
            structure_str(target, str)
            if not isinstance(settings, Mapping):
                raise SettingError(target, f"must be a mapping of settings, got {_describe(settings)}")
            for key in settings:
                if not isinstance(key, str):
                    raise SettingError(target, f"setting keys must be strings, got {_describe(key)}")
            result[target] = dict(settings)
        return result

    conv.register_structure_hook_func(lambda tp: tp is TargetSettings, structure_target_settings)
    conv.register_structure_hook(
        DistillationSetting,
        make_dict_structure_fn(
            DistillationSetting, conv, lambda_=override(rename="lambda"), _cattrs_forbid_extra_keys=True
        ),
    )
    return conv


converter = _make_converter()


# -- error paths ----------------------------------------------------------------------------


def _leaf_errors(exc: BaseException, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], BaseException]]:
    """Flatten cattrs' exception groups into (key path, leaf exception) pairs."""
    if isinstance(exc, (ClassValidationError, IterableValidationError)):
        found: list[tuple[tuple[str, ...], BaseException]] = []
        for sub in exc.exceptions:
            step = path
            for note in getattr(sub, "__notes__", ()):
                name = getattr(note, "name", None)
                index = getattr(note, "index", None)
                if name is not None:
                    step = path + (str(name),)
                elif index is not None:
                    step = path + (f"[{index}]",)
            found.extend(_leaf_errors(sub, step))
        return found
    if isinstance(exc, SettingError):
        return [(path + (exc.key,), exc)]
    return [(path, exc)]


def _join(path: tuple[str, ...]) -> str:
    text = ""
    for part in path:
        text += part if part.startswith("[") else (f".{part}" if text else part)
    return text


def _message(exc: BaseException, known: list[str]) -> str:
    if isinstance(exc, ForbiddenExtraKeysError):
        if attrs.has(exc.cl):
            known = field_names(exc.cl)
        extra = sorted(exc.extra_fields, key=repr)  # keys of a nested dict need not be str
        hints = []
        for key in extra:
            close = difflib.get_close_matches(key, known, n=1) if isinstance(key, str) else []
            hints.append(f"{key!r}" + (f" (did you mean '{close[0]}'?)" if close else ""))
        return f"unknown key {', '.join(hints)}; known keys: {', '.join(known)}"
    if isinstance(exc, KeyError):
        return f"missing required key {exc.args[0]!r}" if exc.args else "missing required key"
    return str(exc)


def field_names(cls: type) -> list[str]:
    """The config-facing key names of an attrs settings class."""
    return [a.alias.rstrip("_") if a.name.endswith("_") else a.name for a in attrs.fields(cls)]


def structure_setting(
    data: Mapping[str, Any],
    cls: type,
    *,
    entry: int | None,
    module: str | None = None,
    key_paths: Mapping[str, str] | None = None,
    prefix: str | None = None,
) -> Any:
    """Structure ``data`` into ``cls`` or raise a :class:`ConfigError` naming the key.

    ``key_paths`` maps a top-level key of ``data`` to the path the user wrote it at (a
    shorthand key sits at the entry's top level, an override under ``target_settings.<t>``).
    """
    try:
        return converter.structure(dict(data), cls)
    except (ClassValidationError, IterableValidationError, SettingError, ValueError, TypeError) as exc:
        path, leaf = _leaf_errors(exc)[0] if isinstance(exc, Exception) else ((), exc)
        known = field_names(cls) if attrs.has(cls) else []
        if path and attrs.has(cls):
            # Name the key as the user writes it (``lambda``), not as the attribute (``lambda_``).
            renamed = {a.name: key for a, key in zip(attrs.fields(cls), known)}
            path = (renamed.get(path[0], path[0]),) + path[1:]
        if isinstance(leaf, ForbiddenExtraKeysError) and len(path) == 0 and key_paths:
            # Point at the unknown key where the user wrote it: its full path if it came from a
            # known place (a shorthand key or target_settings.<t>.<key>), else under ``prefix``.
            bad = sorted(leaf.extra_fields, key=repr)[0]
            if bad in key_paths:
                full = key_paths[bad]
            else:
                full = _join(((prefix,) if prefix else ()) + (str(bad),))
            raise ConfigError(_message(leaf, known), entry=entry, key=full or None, module=module) from None
        if path and key_paths and path[0] in key_paths:
            path = tuple(key_paths[path[0]].split(".")) + path[1:]
        elif prefix:
            path = (prefix,) + path
        raise ConfigError(_message(leaf, known), entry=entry, key=_join(path) or None, module=module) from None


def read_data_file(path: str | os.PathLike[str]) -> Any:
    """Parse a JSON or YAML (``.yaml``/``.yml``) file, or raise a ConfigError saying why."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text)
        return json.loads(text)
    except Exception as exc:  # both parsers' errors carry line/column in their text
        raise ConfigError(f"cannot parse {path}: {exc}") from None
