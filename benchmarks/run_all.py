"""Run every benchmark script of this folder, one after another, on this machine.

The scripts print markdown tables (ratios included) but not the sections of
docs/benchmarks.md, whose prose explains each table; so this runner does not rewrite that page.
It prints one report instead: a header with the machine (CPU model, CPU count, torch threads,
Python and torch versions, UTC date and time), then each script's command line and output
under a heading of its own, so that every table of one report was measured on the same
machine in the same session. Copy the tables into docs/benchmarks.md when updating it.

Usage::

    .venv/bin/python benchmarks/run_all.py [--quick] [--only speedup masks ...] [--output FILE]

``--quick`` runs each script with fewer repeats (a smoke run; the numbers are noisier).
A script that fails is reported with its exit status and stderr, and the others still run;
the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Arguments for --quick; scripts not listed run with their defaults either way.
QUICK: dict[str, list[str]] = {
    "dependency": ["--repeats", "2"],
    "masks": ["--repeats", "2"],
    "overhead": ["--repeats", "5"],
    "quantization": ["--quick"],
    "speedup": ["--repeats", "2"],
}


def scripts() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.py") if p.stem not in ("run_all", "__init__"))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_header() -> str:
    import torch

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join(
        [
            "# compress-core benchmarks (benchmarks/run_all.py)",
            "",
            f"- Machine: {cpu_model()}, {os.cpu_count()} CPUs ({platform.system()} {platform.release()})",
            f"- torch threads by default: {torch.get_num_threads()} (each script sets its own; see its section)",
            f"- Python {platform.python_version()}, torch {torch.__version__}",
            f"- Date: {now}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats per script")
    parser.add_argument("--only", nargs="+", choices=scripts(), help="run only these scripts")
    parser.add_argument("--output", type=Path, help="also write the report to this file")
    args = parser.parse_args(argv)

    parts = [machine_header()]
    failed = 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for name in args.only or scripts():
        command = [sys.executable, str(HERE / f"{name}.py")] + (
            QUICK.get(name, []) if args.quick else []
        )
        print(f"running {name} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        # One script at a time: parallel runs would load the same cores and distort each other.
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=HERE.parent)
        seconds = time.perf_counter() - started
        shown = " ".join(["python", f"benchmarks/{name}.py", *command[2:]])
        section = [f"## {name}", "", f"`{shown}` ({seconds:.0f} s)", "", done.stdout.rstrip()]
        if done.returncode != 0:
            failed += 1
            section += [
                "",
                f"**Failed with exit status {done.returncode}:**",
                "",
                "```",
                done.stderr.rstrip()[-4000:],
                "```",
            ]
        parts.append("\n".join(section))
    report = "\n\n".join(parts) + "\n"
    print(report)
    if args.output is not None:
        args.output.write_text(report)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
