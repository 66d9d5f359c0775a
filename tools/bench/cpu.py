"""CPU seconds spent by named groups of processes over a measured window, from /proc (Linux).

Why: on a 2-core machine throughput is bounded by CPU, so the side-by-side runs/s of the mesh and
DBOS is explained by what each run costs in CPU and where (broker, Redis, each service; DBOS's
process and PostgreSQL). A group is a root PID and, optionally, its descendants (PostgreSQL's
backends are children of the postmaster). A process that appears during the window counts from
zero; one that exits during it loses what it spent (a pool keeps its backends, so this is rare).

Standard library only: tools/bench/dbos_peer.py runs in its own venv and loads this file by path."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (which may hold spaces and parentheses):
    [0] state, [1] parent PID, [11] user and [12] system CPU ticks, [19] start time; None once gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def cpu_seconds(pid: int) -> float:
    """User + system CPU of every thread of ``pid`` so far; 0.0 once it is gone."""
    fields = stat(pid)
    return (int(fields[11]) + int(fields[12])) / _TICKS if fields else 0.0


def descendants(root: int) -> list[int]:
    """``root``'s live children, their children, ... (a scan of /proc; not root itself; no zombies)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := stat(int(entry))) and fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def tree_cpu_seconds(roots: Iterable[int]) -> float:
    """CPU seconds so far of ``roots`` and every live process below them."""
    return sum(cpu_seconds(pid) for root in roots for pid in (root, *descendants(root)))


@dataclass(frozen=True)
class Group:
    root: int
    tree: bool = False  # count the root's descendants too

    def pids(self) -> list[int]:
        return [self.root, *(descendants(self.root) if self.tree else [])]


@dataclass
class CpuMeter:
    """``start()`` then ``stop()``: CPU seconds per group in between."""

    groups: Mapping[str, Group]
    _before: dict[str, dict[int, float]] = field(default_factory=dict)

    def _sample(self) -> dict[str, dict[int, float]]:
        return {name: {pid: cpu_seconds(pid) for pid in g.pids()} for name, g in self.groups.items()}

    def start(self) -> CpuMeter:
        self._before = self._sample()
        return self

    def stop(self) -> dict[str, float]:
        after = self._sample()
        return {name: sum(max(0.0, s - self._before.get(name, {}).get(pid, 0.0)) for pid, s in pids.items())
                for name, pids in after.items()}


def per_run_ms(seconds: Mapping[str, float], runs: int, *, total_of: Iterable[str] | None = None) -> dict[str, float]:
    """CPU milliseconds per run for each group, and ``total`` over ``total_of`` (default: all)."""
    runs = max(runs, 1)
    out = {name: round(1000 * s / runs, 2) for name, s in seconds.items()}
    names = list(total_of) if total_of is not None else list(seconds)
    out["total"] = round(1000 * sum(seconds[n] for n in names) / runs, 2)
    return out
