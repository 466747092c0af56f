"""Canonicalization: a config list becomes one record per (module, target) with full settings.

Order of work for each entry (all before the model is touched):
1. structure the common keys and the kind's entry keys; every other key is a shorthand
   setting key and must be a key of the settings class;
2. select modules;
3. per module: the targets are ``target_names`` (or the kind's defaults for the module type,
   supplied by plugins), plus any target named in ``target_settings``;
4. per target: default settings, then the shorthand keys that the default settings have
   (all shorthand keys for a target without defaults), then ``target_settings[target]``;
5. the configure-once rule (first entry wins) or, for quantization, the overwrite rule.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any, cast

import attrs
import torch.nn as nn

from .config import COMMON_KEYS, KINDS, EntryCommon, converter, field_names, structure_setting
from .errors import ConfigError, warn_config
from .registry import PluginHost, get_host
from .selection import select_modules
from .targets import TargetRef, resolve_target

__all__ = ["TargetRecord", "canonicalize"]


@attrs.frozen
class TargetRecord:
    """One resolved compression target."""

    module_name: str
    module_type: str
    target_name: str
    """Canonical target name (``_input_x`` is reported as ``_input_0`` when positional)."""
    kind: str
    settings: Any
    """An instance of the kind's (or the method's) settings class."""
    entry: int
    """Index of the config entry that configured this target."""
    target: TargetRef = attrs.field(repr=False)
    entry_settings: Mapping[str, Any] = attrs.field(factory=dict, repr=False)
    """Entry-level keys of the kind, e.g. ``fuse_names`` for quantization."""

    def settings_dict(self) -> dict[str, Any]:
        data = converter.unstructure(self.settings)
        if "lambda_" in data:
            data["lambda"] = data.pop("lambda_")
        return data


def canonicalize(
    model: nn.Module,
    config_list: Sequence[Mapping[str, Any]],
    kind: str,
    *,
    setting_cls: type | None = None,
    host: PluginHost | None = None,
) -> list[TargetRecord]:
    """Resolve ``config_list`` for ``kind`` on ``model`` into target records.

    :raises ConfigError: on any invalid key or value, naming entry, key and module.
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown kind {kind!r}; use one of {', '.join(KINDS)}")
    kind_info = KINDS[kind]
    setting_cls = setting_cls or kind_info.setting_cls
    host = host or get_host()
    if isinstance(config_list, (str, bytes, Mapping)) or not isinstance(config_list, Sequence):
        raise ConfigError(f"must be a list of dicts, got {type(config_list).__name__}")

    setting_keys = field_names(setting_cls)
    records: dict[tuple[str, str], TargetRecord] = {}
    for index, raw in enumerate(config_list):
        if not isinstance(raw, Mapping):
            raise ConfigError(f"must be a dict, got {type(raw).__name__}", entry=index)
        for key in raw:
            if not isinstance(key, str):
                raise ConfigError(f"keys must be strings, got {key!r}", entry=index)
        common = structure_setting(
            {k: raw[k] for k in COMMON_KEYS if k in raw}, EntryCommon, entry=index
        )
        entry_settings = {}
        for key, tp in kind_info.entry_keys.items():
            if key in raw:
                entry_settings[key] = structure_value(raw[key], tp, entry=index, key=key)
        shorthand = {
            k: v for k, v in raw.items() if k not in COMMON_KEYS and k not in kind_info.entry_keys
        }
        for key in shorthand:
            if key not in setting_keys:
                known = [*COMMON_KEYS, *kind_info.entry_keys, *setting_keys]
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(
                    f"unknown key '{key}'{hint}; {kind} keys: {', '.join(known)}", entry=index, key=key
                )

        modules = select_modules(model, common, index)
        if "fuse_names" in entry_settings:
            _check_fuse_names(model, entry_settings["fuse_names"], modules, index)

        used_shorthand: set[str] = set()
        seen_targets: set[str] = set()
        selected = 0
        for module_name, module in modules.items():
            defaults = host.default_targets(kind, module)
            names = list(common.target_names) if common.target_names is not None else list(defaults)
            names += [t for t in common.target_settings or {} if t not in names]
            names = list(dict.fromkeys(names))  # a name listed twice is one target
            explicit = set(common.target_names or ()) | set(common.target_settings or {})
            target_settings = common.target_settings or {}
            # Resolve first: '_input_', '_input_0' and '_input_x' may name one target, whose
            # defaults and target_settings then apply under whichever spelling they were given.
            spellings: dict[str, list[str]] = {}
            refs: dict[str, TargetRef] = {}
            for target_name in names:
                try:
                    ref = resolve_target(module, target_name)
                except ValueError as exc:
                    if target_name not in explicit:
                        continue  # a default target the module lacks, e.g. bias=False
                    key = (
                        f"target_settings.{target_name}"
                        if target_name in target_settings
                        else "target_names"
                    )
                    raise ConfigError(str(exc), entry=index, key=key, module=module_name) from None
                spellings.setdefault(ref.name, []).append(target_name)
                refs.setdefault(ref.name, ref)
            for canonical_name, aliases in spellings.items():
                ref = refs[canonical_name]
                configured = [t for t in aliases if t in target_settings]
                if len(configured) > 1:
                    raise ConfigError(
                        f"'{configured[0]}' and '{configured[1]}' name the same target of "
                        f"{type(module).__name__}; configure it under one name",
                        entry=index,
                        key=f"target_settings.{configured[1]}",
                        module=module_name,
                    )
                target_name = configured[0] if configured else aliases[0]
                seen_targets.update(aliases)
                merged: dict[str, Any] = {}
                in_defaults = [t for t in aliases if t in defaults]
                for alias in in_defaults:
                    merged.update(defaults[alias])
                key_paths: dict[str, str] = {}
                for key, value in shorthand.items():
                    if not in_defaults or key in merged:
                        merged[key] = value
                        key_paths[key] = key
                        used_shorthand.add(key)
                for key, value in target_settings.get(target_name, {}).items():
                    merged[key] = value
                    key_paths[key] = f"target_settings.{target_name}.{key}"
                settings = structure_setting(
                    merged,
                    setting_cls,
                    entry=index,
                    module=module_name,
                    key_paths=key_paths,
                    prefix=f"target_settings.{target_name}",
                )
                record = TargetRecord(
                    module_name=module_name,
                    module_type=type(module).__name__,
                    target_name=ref.name,
                    kind=kind,
                    settings=settings,
                    entry=index,
                    target=ref,
                    entry_settings=entry_settings,
                )
                _place(records, record, kind_info.overwrite)
                selected += 1

        unused = [k for k in shorthand if k not in used_shorthand]
        if unused and selected:
            raise ConfigError(
                f"applies to no target of the selected modules (targets: {', '.join(sorted(seen_targets))}); "
                "name the target in target_names or target_settings",
                entry=index,
                key=unused[0],
            )
        if not selected:
            warn_config(f"config_list[{index}] selects no {kind} target")
    # Model order reads naturally in listings; sorted() is stable, so targets of one module
    # keep the order their entries named them in.
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(records.values(), key=lambda r: order[r.module_name])


def _place(records: dict[tuple[str, str], TargetRecord], record: TargetRecord, overwrite: bool) -> None:
    key = (record.module_name, record.target_name)
    previous = records.get(key)
    if previous is None:
        records[key] = record
        return
    where = f"{record.module_name}.{record.target_name}"
    if previous.entry == record.entry:
        return  # the same entry named one target twice (e.g. _input_0 and _input_x)
    if overwrite:
        warn_config(
            f"config_list[{record.entry}] overwrites the {record.kind} settings of {where} "
            f"from config_list[{previous.entry}]"
        )
        records[key] = record
    else:
        warn_config(
            f"config_list[{record.entry}] configures {where} again; configured by "
            f"config_list[{previous.entry}] already, so this entry does not take effect there"
        )


def structure_value(value: Any, tp: Any, *, entry: int, key: str) -> Any:
    try:
        return converter.structure(value, tp)
    except Exception as exc:  # cattrs raises ValueError/TypeError or groups of them
        leaf: BaseException = exc
        while getattr(leaf, "exceptions", None):
            leaf = cast(Any, leaf).exceptions[0]
        raise ConfigError(str(leaf), entry=entry, key=key) from None


def _check_fuse_names(
    model: nn.Module, fuse_names: tuple[tuple[str, ...], ...], modules: Mapping[str, nn.Module], index: int
) -> None:
    from .selection import check_module_name

    for group_index, group in enumerate(fuse_names):
        key = f"fuse_names[{group_index}]"
        if len(group) < 2:
            raise ConfigError("a fuse group names a module and at least one module to fuse into it", entry=index, key=key)
        names = [check_module_name(model, name, entry=index, key=key) for name in group]
        if names[0] not in modules:
            raise ConfigError(
                f"the first module '{group[0]}' must be selected by this entry's op_names/op_names_re",
                entry=index,
                key=key,
            )
