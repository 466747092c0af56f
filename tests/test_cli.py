"""The ``compress`` command line: ``plugins`` and ``explain``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from compress_core import cli

ROOT = Path(__file__).resolve().parents[1]
MODEL = f"{ROOT / 'examples/quickstart/models.py'}:digits_cnn"


def test_plugins_json_lists_builtin_plugins_with_their_distribution(capsys):
    assert cli.main(["plugins", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    pruning = rows["pruning"]
    assert pruning["distribution"] == "compress-core"
    assert pruning["status"] == "ok"
    assert pruning["module"] == "compress_pruning.plugin"
    level = next(m for m in pruning["methods"] if m["name"] == "level")
    assert level["kind"] == "pruning" and "LevelPruner" in level["aliases"]
    assert sorted(pruning["hooks"]) == ["compress_register_defaults", "compress_register_methods"]


def test_plugins_table_has_one_row_per_method(capsys):
    assert cli.main(["plugins"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["plugin", "distribution", "version", "method", "kind", "summary"]
    level_rows = [line for line in lines if " level " in line]
    assert len(level_rows) == 1
    # The plugin's name and distribution head its first row; its other methods follow below.
    start = next(i for i, line in enumerate(lines) if line.startswith("pruning "))
    assert "compress-core" in lines[start]
    block = lines[start:]
    end = next((i for i, line in enumerate(block[1:], 1) if not line.startswith(" ")), len(block))
    assert level_rows[0] in block[:end]


def test_explain_prints_the_resolved_targets(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("- op_types: [Linear]\n  sparse_ratio: 0.5\n- op_names: [nope]\n  sparse_ratio: 0.1\n")
    assert cli.main(["explain", MODEL, str(config), "--method", "level", "--json"]) == 0
    captured = capsys.readouterr()
    records = json.loads(captured.out)
    # DigitsCNN has two Linear layers, each with weight + bias aligned to the weight rows.
    assert [(r["module"], r["target"]) for r in records] == [
        ("fc1", "weight"), ("fc1", "bias"), ("fc2", "weight"), ("fc2", "bias")
    ]
    assert records[0]["settings"]["sparse_ratio"] == 0.5
    assert records[1]["settings"]["align"] == {"module_name": None, "target_name": "weight", "dims": [0]}
    assert "sparse_ratio" not in {k for k, v in records[1]["settings"].items() if v is not None}
    # The entry that selects nothing is reported, with the unknown name.
    assert "no module named 'nope'" in captured.err
    assert "config_list[1] selects no pruning target" in captured.err


def test_explain_table_and_json_config(tmp_path, capsys):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"config_list": [{"op_names": ["conv1"], "sparse_ratio": 0.25}]}))
    assert cli.main(["explain", MODEL, str(config), "--kind", "pruning"]) == 0
    out = capsys.readouterr().out
    assert "conv1   Conv2d  weight  0      sparse_ratio=0.25" in out
    assert "2 pruning target(s) on 1 module(s)" in out


def test_explain_reports_config_errors_with_exit_status_2(tmp_path, capsys):
    config = tmp_path / "c.json"
    config.write_text(json.dumps([{"op_types": ["Linear"], "sparse_ratio": 1.5}]))
    assert cli.main(["explain", MODEL, str(config), "--kind", "pruning"]) == 2
    assert "config_list[0].sparse_ratio (module 'fc1'): must be within [0, 1], got 1.5" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("model", "message"),
    [("no_colon", "expected MODULE:FACTORY"), (f"{ROOT}/missing.py:f", "no such file"),
     (f"{ROOT / 'examples/quickstart/models.py'}:nothing", "has no attribute 'nothing'")],
)
def test_explain_bad_model_spec(tmp_path, capsys, model, message):
    config = tmp_path / "c.json"
    config.write_text("[]")
    assert cli.main(["explain", model, str(config), "--kind", "pruning"]) == 2
    assert message in capsys.readouterr().err


def test_explain_unknown_method_lists_registered(tmp_path, capsys):
    config = tmp_path / "c.json"
    config.write_text("[]")
    assert cli.main(["explain", MODEL, str(config), "--method", "wanda"]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'wanda'" in err and "level" in err and "compress plugins" in err


def test_console_script_is_installed():
    result = subprocess.run(
        [str(Path(sys.executable).with_name("compress")), "plugins", "--json"],
        capture_output=True, text=True, check=True,
    )
    assert any(row["name"] == "pruning" for row in json.loads(result.stdout))
