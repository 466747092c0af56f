"""Machine-load readings shared by the benchmark scripts (Linux ``/proc/stat``)."""

from __future__ import annotations

import os
import time


def cpu_snapshot(children: bool = False) -> tuple[float, float, float] | None:
    """(wall s, CPU s busy on the whole machine, CPU s of this process), Linux only.

    ``children``: also count the CPU time of this process's finished (waited-for) children,
    for a runner whose own work happens in subprocesses (benchmarks/run_all.py).
    """
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # minus idle, iowait
    own = os.times()
    mine = own.user + own.system
    if children:
        mine += own.children_user + own.children_system
    return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), mine


def foreign_load(
    before: tuple[float, float, float] | None, children: bool = False
) -> float | None:
    """Average number of CPUs other processes kept busy since ``before`` (noise indicator).

    ``children`` must match the ``cpu_snapshot`` call that gave ``before``.
    """
    after = cpu_snapshot(children)
    if before is None or after is None or after[0] <= before[0]:
        return None
    return max(0.0, ((after[1] - before[1]) - (after[2] - before[2])) / (after[0] - before[0]))
