"""Train-step overhead of a masked model over the plain model.

Measures forward + backward + ``SGD.step()`` on two models, in one process:

* ``cnn``: Conv2d 3->32->64->64 (3x3, ReLU, 2x2 max-pool after the first two) on 32x32 inputs,
  batch 64, then a Linear(64*8*8, 10) head;
* ``mlp``: 4 x Linear(1024, 1024) (ReLU between), batch 64.

Variants of each model (same initial weights, same inputs):

* ``plain``: the model as is;
* ``compress_core``: ``compress_core.create("level", model, [{"op_types": ["Conv2d", "Linear"],
  "sparse_ratio": 0.5}])`` then ``comp.compress()``, so the masks are active in forward (the
  plugin's defaults also mask each bias, aligned to the weight's output channels);
* ``torch_prune``: ``torch.nn.utils.prune.l1_unstructured(module, "weight", amount=0.5)`` on the
  same layers (the common alternative).

Timing: a few warm-up steps per variant, then ``--repeats`` rounds; in every round each variant
runs ``--steps`` steps back to back and the mean step time of that block is one sample. The order
of the variants rotates from round to round so that slow drift (frequency, other load) is shared.
The reported number is the median sample. Everything runs once per thread count
(``torch.set_num_threads``). The CPU time other processes used during each measurement is
reported too (Linux), since a busy machine skews the numbers.

Usage::

    python benchmarks/overhead.py                      # 1 thread, then 2 threads
    python benchmarks/overhead.py --threads 1 --repeats 30
    python benchmarks/overhead.py --json overhead.json

Nothing is asserted: the script reports.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import prune

import compress_core

# Also importable as a module (tests load this file): the shared helpers sit beside it.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_snapshot, foreign_load

VARIANTS = ("plain", "compress_core", "torch_prune")
SPARSE_RATIO = 0.5
BATCH = 64


# -- models --------------------------------------------------------------------------------------


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.conv3(x))
        return self.fc(x.flatten(1))


def make_mlp() -> nn.Module:
    layers: list[nn.Module] = []
    for i in range(4):
        layers.append(nn.Linear(1024, 1024))
        if i < 3:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def make_cnn_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 3, 32, 32, generator=g), torch.randint(0, 10, (BATCH,), generator=g)


def make_mlp_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(BATCH, 1024, generator=g), torch.randint(0, 1024, (BATCH,), generator=g)


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple[torch.Tensor, torch.Tensor]], str]] = {
    "cnn": (SmallCNN, make_cnn_data, "Conv2d 3->32->64->64 on 32x32 + Linear head, batch 64"),
    "mlp": (make_mlp, make_mlp_data, "4 x Linear(1024, 1024), batch 64"),
}


# -- variants ------------------------------------------------------------------------------------


def prunable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def build_variants(base: nn.Module) -> dict[str, nn.Module]:
    plain = copy.deepcopy(base)

    cc = copy.deepcopy(base)
    config = [{"op_types": ["Conv2d", "Linear"], "sparse_ratio": SPARSE_RATIO}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        comp = compress_core.create("level", cc, config)
        comp.compress()

    tp = copy.deepcopy(base)
    for _, module in prunable(tp):
        prune.l1_unstructured(module, "weight", amount=SPARSE_RATIO)

    return {"plain": plain, "compress_core": cc, "torch_prune": tp}


def mask_memory(model: nn.Module, variant: str) -> dict[str, float]:
    """Bytes of mask buffers per masked element (elements of the tensors the masks cover)."""
    mask_bytes = 0
    covered = 0
    for _, module in prunable(model):
        for name, buf in module.named_buffers(recurse=False):
            if variant == "compress_core" and name.endswith("__pruning_mask"):
                target = name[: -len("__pruning_mask")]
            elif variant == "torch_prune" and name.endswith("_mask"):
                target = name[: -len("_mask")]
            else:
                continue
            mask_bytes += buf.numel() * buf.element_size()
            # torch prune keeps the original as `<name>_orig`; the masked value is an attribute.
            covered += getattr(module, target).numel()
    return {
        "mask_bytes": mask_bytes,
        "masked_elements": covered,
        "bytes_per_element": mask_bytes / covered if covered else float("nan"),
    }


def _sparsity_of(model: nn.Module, x: torch.Tensor) -> float:
    """Fraction of zeros in the weights the forward pass uses (sanity information).

    Read in a forward pre-hook registered after the pruning hooks, so it sees the masked weight.
    """
    seen: list[torch.Tensor] = []
    handles = [
        m.register_forward_pre_hook(lambda mod, args: seen.append(mod.weight.detach().clone()))
        for _, m in prunable(model)
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    zeros = sum(int((w == 0).sum()) for w in seen)
    total = sum(w.numel() for w in seen)
    return zeros / total if total else float("nan")


# -- timing --------------------------------------------------------------------------------------


class Runner:
    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        self.model = model
        self.x = x
        self.y = y
        # Built after pruning: torch prune replaces `weight` by `weight_orig` (compress-core does
        # not change parameters, but build both the same way).
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()

    def block(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        return (time.perf_counter() - start) / steps


def bench_model(name: str, threads: int, repeats: int, steps: int, warmup: int) -> dict[str, object]:
    factory, data, _ = MODELS[name]
    torch.manual_seed(0)
    base = factory()
    x, y = data()
    models = build_variants(base)
    runners = {v: Runner(m, x, y) for v, m in models.items()}
    for runner in runners.values():
        for _ in range(warmup):
            runner.step()
    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
    snapshot = cpu_snapshot()
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
            for v in order:
                samples[v].append(runners[v].block(steps))
    finally:
        if gc_was_enabled:
            gc.enable()
    med = {v: statistics.median(s) for v, s in samples.items()}
    result: dict[str, object] = {
        "model": name,
        "threads": threads,
        "other_processes_cpus": foreign_load(snapshot),
        "variants": {},
    }
    for v in VARIANTS:
        s = samples[v]
        q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0], s[0], s[0]]
        result["variants"][v] = {  # type: ignore[index]
            "median_ms": med[v] * 1e3,
            "q1_ms": q[0] * 1e3,
            "q3_ms": q[2] * 1e3,
            "ratio_vs_plain": med[v] / med["plain"],
            # Median of the per-round ratios: pairs each sample with plain's from the same round.
            "paired_ratio_vs_plain": statistics.median(
                a / b for a, b in zip(s, samples["plain"])
            ),
            "samples_ms": [t * 1e3 for t in s],
        }
    return result


def mask_report(name: str) -> dict[str, object]:
    factory, data, _ = MODELS[name]
    torch.manual_seed(0)
    models = build_variants(factory())
    x, _ = data()
    out: dict[str, object] = {}
    for v in ("compress_core", "torch_prune"):
        info: dict[str, object] = dict(mask_memory(models[v], v))
        info["effective_weight_sparsity"] = _sparsity_of(models[v], x)
        out[v] = info
    return out


# -- environment ---------------------------------------------------------------------------------


def machine() -> dict[str, object]:
    model_name = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                model_name = line.split(":", 1)[1].strip()
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "load_average_at_start": load,
        "cpu": model_name,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "compress_core": compress_core.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def print_table(results: list[dict[str, object]]) -> None:
    print(
        "| model | threads | plain (ms) | compress-core (ms) | ratio | torch prune (ms) | ratio "
        "| other load (CPUs) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        v = r["variants"]
        p, c, t = v["plain"], v["compress_core"], v["torch_prune"]  # type: ignore[index]
        load = r["other_processes_cpus"]
        load_text = "n/a" if load is None else f"{load:.2f}"
        print(
            f"| {r['model']} | {r['threads']} | {p['median_ms']:.2f} | {c['median_ms']:.2f} | "
            f"{c['ratio_vs_plain']:.3f}x | {t['median_ms']:.2f} | {t['ratio_vs_plain']:.3f}x "
            f"| {load_text} |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1, 2],
        help="torch thread counts to run, in order (default: 1 2)",
    )
    parser.add_argument("--repeats", type=int, default=25, help="timed rounds per variant (default: 25)")
    parser.add_argument("--steps", type=int, default=5, help="train steps per timed sample (default: 5)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per variant (default: 5)")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["cnn", "mlp"])
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON to PATH")
    args = parser.parse_args(argv)

    env = machine()
    print("# compress-core train-step overhead")
    print(f"cpu: {env['cpu']} ({env['cpus']} CPUs), torch {env['torch']}, python {env['python']}, {env['date']}")
    load = env["load_average_at_start"]
    if load is not None:
        print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"repeats {args.repeats} x {args.steps} steps, warm-up {args.warmup}; sparse_ratio {SPARSE_RATIO}")
    for name in args.models:
        print(f"  {name}: {MODELS[name][2]}")
    print()

    started = time.perf_counter()
    results = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name in args.models:
            results.append(bench_model(name, threads, args.repeats, args.steps, args.warmup))
            print(f"  done {name} @ {threads} thread(s)  [{time.perf_counter() - started:.0f} s]", file=sys.stderr)
    print_table(results)
    print(
        "\nratio = median step time / plain's. other load = CPUs that other processes kept busy "
        "during the timing (from /proc/stat); above ~0.1 the numbers are disturbed."
    )
    print()

    masks = {name: mask_report(name) for name in args.models}
    print("| model | variant | mask bytes | masked elements | bytes/element | weight sparsity in forward |")
    print("|---|---|---:|---:|---:|---:|")
    for name, per in masks.items():
        for v, info in per.items():
            print(
                f"| {name} | {v} | {info['mask_bytes']} | {info['masked_elements']} | "
                f"{info['bytes_per_element']:.3f} | {info['effective_weight_sparsity']:.3f} |"
            )
    print(f"\ntotal {time.perf_counter() - started:.0f} s")

    if args.json:
        payload = {
            "machine": env,
            "settings": {
                "threads": args.threads,
                "repeats": args.repeats,
                "steps": args.steps,
                "warmup": args.warmup,
                "batch": BATCH,
                "sparse_ratio": SPARSE_RATIO,
                "models": {n: MODELS[n][2] for n in args.models},
            },
            "results": results,
            "masks": masks,
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
