"""Run every benchmark script of this folder in one session and regenerate docs/benchmarks.md.

The scripts run one after another on this machine (never in parallel: they would load the
same cores). Each prints markdown tables with ratios; this runner turns each script's output
into one region of docs/benchmarks.md and writes a header region with the machine, the
software versions, the date and the load other processes put on the machine during the run.

docs/benchmarks.md marks what is generated with HTML comments::

    <!-- run_all:machine -->   ... the header ...          <!-- /run_all:machine -->
    <!-- run_all:overhead -->  ... benchmarks/overhead.py ... <!-- /run_all:overhead -->

one pair per script (``scripts()``) plus ``machine``. ``--write PAGE`` replaces only the text
between the markers, so the prose around them (method, models, how to read a table) stays and
every measured number on the page comes from the one run. The page is checked before anything
runs (each marker exactly once, no region without a script), is written atomically, and is not
written at all when a script fails.

Usage::

    .venv/bin/python benchmarks/run_all.py --write docs/benchmarks.md   # regenerate the page
    .venv/bin/python benchmarks/run_all.py [--quick] [--only speedup masks ...] [--output FILE]

Without ``--write`` it prints the report (header, then each script's command line and
output). ``--quick`` runs each script with fewer repeats (a smoke run; the numbers are
noisier). The exit status is 1 if any script failed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _machine import cpu_snapshot, foreign_load  # noqa: E402  (needs HERE on the path)

# Passed to a script on every run: the scripts whose default output is not markdown.
ALWAYS: dict[str, list[str]] = {
    "dependency": ["--markdown"],
    "masks": ["--markdown"],
}

# Arguments for --quick; scripts not listed run with their defaults either way.
QUICK: dict[str, list[str]] = {
    "dependency": ["--repeats", "2"],
    "masks": ["--repeats", "2"],
    "overhead": ["--repeats", "5"],
    "quantization": ["--quick"],
    "speedup": ["--repeats", "2"],
}

MACHINE = "machine"


class PageError(ValueError):
    """docs/benchmarks.md's generated regions do not match what run_all.py produces."""


@dataclass
class ScriptRun:
    """One script's run: what was called, how it went and what it printed."""

    name: str
    args: list[str]
    seconds: float
    returncode: int
    stdout: str
    stderr: str
    other_load: float | None
    # CPU seconds the script used: with the wall time it tells how much of a run on a busy
    # machine was waiting, i.e. roughly how long the run takes on an idle one.
    cpu_seconds: float | None = None

    @property
    def shown(self) -> str:
        return " ".join(["python", f"benchmarks/{self.name}.py", *self.args])


def scripts() -> list[str]:
    """The benchmark scripts, by name: every ``*.py`` here but this runner and helpers (``_*``)."""
    return sorted(
        p.stem for p in HERE.glob("*.py") if p.stem != "run_all" and not p.stem.startswith("_")
    )


# -- the page ------------------------------------------------------------------------------------


def open_marker(name: str) -> str:
    return f"<!-- run_all:{name} -->"


def close_marker(name: str) -> str:
    return f"<!-- /run_all:{name} -->"


_MARKER = re.compile(r"<!--\s*(/?)run_all:([A-Za-z0-9_.-]+)\s*-->")


def region_names(page: str) -> list[str]:
    """Names of the regions the page opens, in page order (duplicates kept)."""
    return [m.group(2) for m in _MARKER.finditer(page) if not m.group(1)]


def replace_regions(page: str, regions: dict[str, str]) -> str:
    """The page with the text between each region's markers replaced by ``regions[name]``.

    Raises PageError, naming the marker, when a region of ``regions`` is missing or its markers
    appear more than once or out of order, and when the page has a region no entry of
    ``regions`` fills (its numbers would not come from this run).
    """
    for match in _MARKER.finditer(page):
        name = match.group(2)
        if name not in regions:
            raise PageError(
                f"{match.group(0)}: no such region (benchmarks/run_all.py fills: "
                f"{', '.join(regions)}); remove the markers or add the script"
            )
    for name, body in regions.items():
        if _MARKER.search(body):
            raise PageError(f"the new text of region {name!r} contains a run_all marker")
        spans = []
        for marker in (open_marker(name), close_marker(name)):
            count = page.count(marker)
            if count != 1:
                state = "missing" if count == 0 else f"found {count} times"
                raise PageError(f"{marker} must appear exactly once in the page, {state}")
            spans.append(page.index(marker))
        start, end = spans
        if end < start:
            raise PageError(f"{close_marker(name)} comes before {open_marker(name)}")
        inner_start = start + len(open_marker(name))
        if _MARKER.search(page, inner_start, end):
            raise PageError(f"region {name!r} contains another run_all marker")
        page = page[:inner_start] + "\n" + body.strip("\n") + "\n" + page[end:]
    return page


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old or the new file, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- rendering -----------------------------------------------------------------------------------


def _kind(line: str) -> str:
    if not line.strip():
        return "blank"
    if line.lstrip().startswith("|"):
        return "table"
    if line.startswith("#"):
        return "heading"
    return "text"


def render_output(stdout: str) -> str:
    """A script's stdout as markdown that fits inside a section of the page.

    Tables stay as they are; a heading line becomes a bold line (the page's own headings give
    the structure); a single line of text is a paragraph; several lines of text in a row keep
    their line breaks and indentation in a ``text`` block.
    """
    chunks: list[tuple[str, list[str]]] = []
    for line in stdout.splitlines():
        line = line.rstrip()
        kind = _kind(line)
        if kind == "heading" or not chunks or chunks[-1][0] != kind:
            chunks.append((kind, [line]))
        else:
            chunks[-1][1].append(line)
    blocks = []
    for kind, lines in chunks:
        if kind == "blank":
            continue
        if kind == "table":
            blocks.append("\n".join(line.strip() for line in lines))
        elif kind == "heading":
            blocks.append(f"**{lines[0].lstrip('#').strip()}**")
        elif len(lines) == 1:
            blocks.append(lines[0].strip())
        else:
            blocks.append("\n".join(["```text", *lines, "```"]))
    return "\n\n".join(blocks)


def _load_text(load: float | None) -> str:
    return "n/a" if load is None else f"{load:.2f}"


def render_region(run: ScriptRun) -> str:
    """One script's region: its command line, duration and load, then its output."""
    parts = [
        f"`{run.shown}`: {run.seconds:.0f} s; other processes kept "
        f"{_load_text(run.other_load)} CPUs busy meanwhile.",
        render_output(run.stdout),
    ]
    if run.returncode != 0:
        parts += [
            f"**Failed with exit status {run.returncode}:**",
            "\n".join(["```text", run.stderr.rstrip()[-4000:], "```"]),
        ]
    return "\n\n".join(p for p in parts if p)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


@dataclass
class Session:
    """What the header says about the whole run."""

    command: str
    quick: bool
    started: datetime.datetime
    finished: datetime.datetime
    other_load: float | None
    load_average: tuple[float, float, float] | None


def machine_header(session: Session) -> str:
    import torch

    def stamp(t: datetime.datetime) -> str:
        return t.strftime("%Y-%m-%d %H:%M UTC")

    minutes = (session.finished - session.started).total_seconds() / 60
    kind = (
        "a **quick run**: `--quick` takes fewer repeats and leaves MiniLM out of the onnxruntime "
        "table, so these are smoke numbers, noisier than a full run's"
        if session.quick
        else "a full run"
    )
    load = session.load_average
    load_text = "n/a" if load is None else f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}"
    return "\n".join(
        [
            f"Generated by `{session.command}`, {kind}. Everything between `run_all` markers on "
            "this page comes from this one run; edit the prose around them, not the numbers.",
            "",
            f"- **Machine:** {cpu_model()}, {os.cpu_count()} CPUs, {platform.system()} "
            f"{platform.release()}",
            f"- **Software:** Python {platform.python_version()}, torch {torch.__version__}, "
            f"compress-core {_version('compress-core')}, Torch-Pruning {_version('torch-pruning')}, "
            f"onnxruntime {_version('onnxruntime')}, transformers {_version('transformers')}",
            f"- **Threads:** torch defaults to {torch.get_num_threads()}; each script sets its "
            "own, given in its table (a `threads` column) or its first line",
            f"- **Date:** {stamp(session.started)} to {stamp(session.finished)} "
            f"({minutes:.1f} min)",
            f"- **Other load:** other processes kept {_load_text(session.other_load)} CPUs busy on "
            f"average during the run (load average 1/5/15 min at the start: {load_text}); "
            "above ~0.1 the times are disturbed",
        ]
    )


# -- running -------------------------------------------------------------------------------------


def run_script(name: str, quick: bool) -> ScriptRun:
    args = ALWAYS.get(name, []) + (QUICK.get(name, []) if quick else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    snapshot = cpu_snapshot(children=True)
    cpu_before = os.times()
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(HERE / f"{name}.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=HERE.parent,
    )
    cpu_after = os.times()
    return ScriptRun(
        name=name,
        args=args,
        seconds=time.perf_counter() - started,
        returncode=done.returncode,
        stdout=done.stdout,
        stderr=done.stderr,
        other_load=foreign_load(snapshot, children=True),
        cpu_seconds=(cpu_after.children_user + cpu_after.children_system)
        - (cpu_before.children_user + cpu_before.children_system),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats per script")
    parser.add_argument("--only", nargs="+", choices=scripts(), help="run only these scripts")
    parser.add_argument("--output", type=Path, help="also write the report to this file")
    parser.add_argument(
        "--write",
        type=Path,
        metavar="PAGE",
        help="replace the generated regions of PAGE (docs/benchmarks.md) with this run's",
    )
    args = parser.parse_args(argv)
    if args.write is not None and args.only:
        parser.error("--write regenerates every region from one run; it cannot be used with --only")
    names = args.only or scripts()

    if args.write is not None:
        # Check the page before the benchmarks run: a bad marker should not cost a full run.
        try:
            replace_regions(args.write.read_text(), {n: "" for n in [MACHINE, *names]})
        except (OSError, PageError) as exc:
            print(f"run_all.py: {args.write}: {exc}", file=sys.stderr)
            return 2

    command = " ".join(
        ["python", "benchmarks/run_all.py", *(argv if argv is not None else sys.argv[1:])]
    )
    started = datetime.datetime.now(datetime.timezone.utc)
    load_average = os.getloadavg() if hasattr(os, "getloadavg") else None
    snapshot = cpu_snapshot(children=True)
    runs = []
    for name in names:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        run = run_script(name, args.quick)
        print(
            f"  {name}: {run.seconds:.0f} s wall, {run.cpu_seconds or 0:.0f} s CPU, exit status "
            f"{run.returncode}, other load {_load_text(run.other_load)}",
            file=sys.stderr,
            flush=True,
        )
        runs.append(run)
    session = Session(
        command=command,
        quick=args.quick,
        started=started,
        finished=datetime.datetime.now(datetime.timezone.utc),
        other_load=foreign_load(snapshot, children=True),
        load_average=load_average,
    )

    header = machine_header(session)
    report = (
        "\n\n".join(
            ["# compress-core benchmarks (benchmarks/run_all.py)", header]
            + [f"## {run.name}\n\n{render_region(run)}" for run in runs]
        )
        + "\n"
    )
    print(report)
    if args.output is not None:
        args.output.write_text(report)
    failed = [run.name for run in runs if run.returncode != 0]
    if failed:
        if args.write is not None:
            print(
                f"run_all.py: {', '.join(failed)} failed; {args.write} left unchanged",
                file=sys.stderr,
            )
        return 1
    if args.write is not None:
        regions = {MACHINE: header, **{run.name: render_region(run) for run in runs}}
        # Read again: prose edited while the benchmarks ran is kept.
        try:
            page = replace_regions(args.write.read_text(), regions)
        except (OSError, PageError) as exc:
            print(f"run_all.py: {args.write}: {exc}", file=sys.stderr)
            return 2
        write_atomically(args.write, page)
        print(f"wrote {args.write}", file=sys.stderr)
        if session.other_load is not None and session.other_load > 0.1:
            print(
                f"run_all.py: other processes kept {session.other_load:.2f} CPUs busy during the "
                "run, so its times are disturbed; rerun on an idle machine before committing them",
                file=sys.stderr,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
