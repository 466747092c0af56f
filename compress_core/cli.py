"""The ``compress`` command line: ``compress plugins``, ``compress explain`` and ``compress run``."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import CompressError

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="compress", description="PyTorch model compression driven by config lists.")
    sub = parser.add_subparsers(dest="command", required=True)

    plugins = sub.add_parser("plugins", help="list installed plugins and their methods")
    plugins.add_argument("--json", action="store_true", help="print the listing as JSON")

    explain = sub.add_parser("explain", help="show the targets a config list selects on a model")
    explain.add_argument("model", help="MODULE:FACTORY or path/to/file.py:FACTORY returning an nn.Module")
    explain.add_argument("config", help="config list as a .json/.yaml/.yml file")
    explain.add_argument("--kind", choices=("pruning", "quantization", "distillation"), default=None)
    explain.add_argument("--method", default=None, help="method name (decides the kind and method-specific keys)")
    explain.add_argument("--json", action="store_true", help="print the records as JSON")

    run = sub.add_parser("run", help="run a run file: train, compress, evaluate, export, report")
    run.add_argument("run_file", help="run file (.yaml/.yml/.json); see docs/run.md")
    run.add_argument("--output", default=None, help="output folder (overrides the run file's 'output')")
    run.add_argument("--quiet", action="store_true", help="no progress bars, no log, no table")

    args = parser.parse_args(argv)
    if args.command == "run":
        return _run(args)
    try:
        if args.command == "plugins":
            return _plugins(args.json)
        return _explain(args)
    except CompressError as exc:
        print(f"compress: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from .errors import ConfigError
    from .runner import run_file

    # Config errors exit 2 (like the other commands); anything failing during the run exits 1.
    try:
        run_file(args.run_file, output=args.output, quiet=args.quiet)
    except ConfigError as exc:
        print(f"compress: error: {args.run_file}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("compress: error: interrupted; nothing was written", file=sys.stderr)
        return 1
    except Exception as exc:
        text = " ".join(str(exc).split()) or type(exc).__name__
        print(f"compress: error: {type(exc).__name__}: {text}", file=sys.stderr)
        return 1
    return 0


def _plugins(as_json: bool) -> int:
    from .registry import get_host

    host = get_host()
    rows: list[dict[str, Any]] = []
    for info in sorted(host.plugins.values(), key=lambda p: p.name):
        rows.append(
            {
                "name": info.name,
                "distribution": info.distribution,
                "version": info.version,
                "module": info.module,
                "status": info.status,
                "error": info.error,
                "hooks": sorted(info.hooks),
                "methods": [
                    {
                        "name": m.name,
                        "kind": m.kind,
                        "summary": m.summary,
                        "aliases": list(m.aliases),
                    }
                    for m in sorted((host.methods[n] for n in info.methods), key=lambda m: m.name)
                ],
            }
        )
    if as_json:
        print(json.dumps(rows, indent=2, sort_keys=True))
        return 0
    table: list[tuple[str, ...]] = [("plugin", "distribution", "version", "method", "kind", "summary")]
    for row in rows:
        dist = (row["distribution"] or "-", row["version"] or "-")
        if row["status"] != "ok":
            table.append((row["name"], *dist, f"[{row['status']}]", "", row["error"] or ""))
            continue
        for i, method in enumerate(row["methods"] or [{"name": "-", "kind": "", "summary": ""}]):
            lead = (row["name"], *dist) if i == 0 else ("", "", "")
            table.append((*lead, method["name"], method["kind"], method["summary"]))
    print(_format_table(table))
    return 0


def _explain(args: argparse.Namespace) -> int:
    from .canonical import canonicalize
    from .registry import get_host

    model = load_factory(args.model)()
    config_list = load_config(args.config)
    kind, setting_cls = args.kind, None
    if args.method is not None:
        info = get_host().method(args.method)
        if kind is not None and kind != info.kind:
            print(f"compress: error: method '{info.name}' is a {info.kind} method, not {kind}", file=sys.stderr)
            return 2
        kind, setting_cls = info.kind, info.compressor.setting_cls
    if kind is None:
        print("compress: error: give --kind or --method", file=sys.stderr)
        return 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = canonicalize(model, config_list, kind, setting_cls=setting_cls)
    if args.json:
        print(json.dumps([_record_json(r) for r in records], indent=2))
    else:
        table: list[tuple[str, ...]] = [("module", "type", "target", "entry", "settings")]
        for record in records:
            table.append(
                (
                    record.module_name or "(root)",
                    record.module_type,
                    record.target_name,
                    str(record.entry),
                    _settings_text(record.settings_dict()),
                )
            )
        print(_format_table(table))
        print(f"\n{len(records)} {kind} target(s) on {len({r.module_name for r in records})} module(s)")
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    return 0


def _record_json(record: Any) -> dict[str, Any]:
    return {
        "module": record.module_name,
        "type": record.module_type,
        "target": record.target_name,
        "kind": record.kind,
        "entry": record.entry,
        "settings": record.settings_dict(),
    }


def _settings_text(settings: dict[str, Any]) -> str:
    # Unset keys (None) are noise in a table; the JSON output keeps them.
    shown = {k: v for k, v in settings.items() if v is not None}
    return ", ".join(f"{k}={v}" for k, v in shown.items())


def _format_table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def load_factory(spec: str) -> Any:
    """Resolve ``MODULE:ATTR`` or ``path/to/file.py:ATTR`` to the object it names."""
    from .errors import ConfigError

    module_part, sep, attr = spec.rpartition(":")
    if not sep or not module_part or not attr:
        raise ConfigError(f"expected MODULE:FACTORY or FILE.py:FACTORY, got {spec!r}")
    if module_part.endswith(".py") or "/" in module_part:
        path = Path(module_part)
        if not path.is_file():
            raise ConfigError(f"no such file: {path}")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_part)
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"{module_part} has no attribute '{attr}'") from None


def load_config(path: str | Path) -> Any:
    """Read a config list from JSON or YAML (a list, or a mapping with ``config_list``)."""
    from .config import read_data_file

    data = read_data_file(path)
    if isinstance(data, dict) and "config_list" in data:
        data = data["config_list"]
    return data


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
