"""``compress run`` under ``torchrun``: two gloo ranks on the CPU match one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("mlxtend")
pytest.importorskip("onnxruntime")
if not torch.distributed.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not built", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]

# Two launches (one process, then torchrun with two) take ~35 s on two cores.
pytestmark = pytest.mark.slow

# No BatchNorm: per-rank batch statistics are the one thing DDP does not make equal to a
# single process (SyncBatchNorm is a user's choice), and the comparison below is exact-ish.
# Each process writes the training batch sizes its model saw, so the test can see the sharding.
NET = """
import atexit, json, os
from torch import nn

SEEN = []
atexit.register(lambda: open(os.path.join(os.environ["SEEN_DIR"], f"seen-{os.environ.get('RANK', 'single')}.json"), "w").write(json.dumps(SEEN)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, stride=2)
        self.relu2 = nn.ReLU()
        self.fc = nn.Conv2d(16, 10, 14)

    def forward(self, x):
        if self.training:
            SEEN.append(len(x))
        return self.fc(self.relu2(self.conv2(self.relu1(self.conv1(x))))).flatten(1)


def build():
    return Net()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_file(folder: Path) -> Path:
    (folder / "net.py").write_text(NET)
    data = {
        "model": "net.py:build",
        "data": {
            "factory": f"{ROOT / 'examples' / 'mnist' / 'data.py'}:load",
            # 512 / 64 = 8 full batches: every batch splits evenly over two ranks.
            "kwargs": {"batch_size": 64, "train_size": 512, "eval_size": 256},
        },
        "output": "unused",
        "seed": 0,
        "latency_runs": 1,
        "steps": [
            {"kind": "train", "epochs": 1, "lr": 0.002},
            {
                "kind": "prune",
                "method": "l1_norm",
                "config_list": [{"op_names": ["conv1", "conv2"], "sparse_ratio": 0.5}],
                "auto_dependency": True,
                "speedup": True,
            },
            {
                "kind": "distill",
                "method": "dynamic_layerwise",
                "params": {"origin_loss_lambda": 1.0},
                "config_list": [{"op_names": ["fc"], "apply_method": "kl"}],
                "epochs": 1,
                "lr": 0.001,
                "max_batches": 4,
            },
            {
                "kind": "quantize",
                "method": "ptq",
                "config_list": [
                    {
                        "op_names": ["conv1", "conv2", "fc"],
                        "target_settings": {"weight": {"granularity": "per_channel"}},
                    }
                ],
                "calibration_batches": 4,
            },
            {"kind": "export", "format": "onnx"},
        ],
    }
    path = folder / "run.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist")
    path = run_file(folder)
    seen = folder / "seen"
    seen.mkdir()
    env = {**os.environ, "SEEN_DIR": str(seen), "HF_HUB_OFFLINE": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    script = "import sys; from compress_core.cli import main; sys.exit(main(sys.argv[1:]))"
    single = subprocess.run(
        [sys.executable, "-c", script, "run", str(path), "--output", str(folder / "single"), "--quiet"],
        env=env, cwd=folder, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr
    launch = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
            "-m", "compress_core.cli", "run", str(path), "--output", str(folder / "dist"), "--quiet",
        ],
        env=env, cwd=folder, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert launch.returncode == 0, launch.stdout + launch.stderr
    return folder


def test_ranks_train_on_halves_of_every_batch(both):
    seen = {p.stem: json.loads(p.read_text()) for p in (both / "seen").iterdir()}
    # train: 8 batches of 64; distill: 4 batches (max_batches) of 64.
    assert seen["seen-single"] == [64] * 12
    assert seen["seen-0"] == [32] * 12
    assert seen["seen-1"] == [32] * 12


def test_only_rank_0_writes(both):
    names = sorted(p.name for p in both.iterdir())
    assert names == ["dist", "net.py", "run.json", "seen", "single"]
    assert sorted(p.name for p in (both / "dist").iterdir()) == sorted(
        p.name for p in (both / "single").iterdir()
    )


def test_two_ranks_match_the_single_process_run(both):
    import safetensors.torch

    single = json.loads((both / "single" / "run.json").read_text())
    dist = json.loads((both / "dist" / "run.json").read_text())
    # Masks follow from the trained weights: the same channels must go.
    assert dist["sparsity"] == single["sparsity"]
    assert [s["name"] for s in dist["stages"]] == [s["name"] for s in single["stages"]]
    for a, b in zip(single["stages"], dist["stages"]):
        assert (a["parameters"], a["flops"], a["size_note"]) == (
            b["parameters"],
            b["flops"],
            b["size_note"],
        )
        # The averaged half-batch gradients equal the full-batch gradient up to the order of
        # float additions (~1e-7 relative); a dozen Adam steps keep the weights within 1e-4
        # (checked below), which can move at most a prediction that sits on a tie: one image
        # of 256 is 0.39 points.
        assert b["metric"] == pytest.approx(a["metric"], abs=0.4), a["name"]
    ws = safetensors.torch.load_file(str(both / "single" / "model" / "model.safetensors"))
    wd = safetensors.torch.load_file(str(both / "dist" / "model" / "model.safetensors"))
    assert ws.keys() == wd.keys()
    for key in ws:
        torch.testing.assert_close(wd[key], ws[key], atol=1e-4, rtol=0)
    # Calibration min/max are reduced over ranks, so the int8 scales match too.
    qs = safetensors.torch.load_file(str(both / "single" / "model" / "model.int8.safetensors"))
    qd = safetensors.torch.load_file(str(both / "dist" / "model" / "model.int8.safetensors"))
    assert qs.keys() == qd.keys()
    for key in qs:
        if qs[key].is_floating_point():
            torch.testing.assert_close(qd[key], qs[key], atol=1e-4, rtol=1e-3)
        else:
            assert (qd[key].int() - qs[key].int()).abs().max() <= 1, key
