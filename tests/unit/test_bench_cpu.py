"""tools/bench/cpu.py: CPU seconds per group of processes, read from /proc, on real processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tools.bench import cpu
from tools.bench import run as bench_run
from tools.bench.peers import headline, pair_points

_SPIN = ("import os, sys, time\n"
         "while not os.path.exists(sys.argv[1]): time.sleep(0.01)\n"  # the test's go: after its meter started
         "t = time.process_time()\n"
         "while time.process_time() - t < {s}: pass\n"
         "time.sleep(60)\n")


def _spinner(go: Path, seconds: float, *, child: bool = False) -> subprocess.Popen[bytes]:
    """A process that, once ``go`` exists, burns ``seconds`` of CPU then sleeps; with ``child``, it does
    so in a grandchild (its parent only waits)."""
    code = _SPIN.format(s=seconds)
    if child:
        code = f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {code!r}, sys.argv[1]])\n"
    return subprocess.Popen([sys.executable, "-c", code, str(go)])


def _until(predicate: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_the_meter_counts_what_a_group_spent_in_the_window_and_a_tree_its_descendants(tmp_path: Path) -> None:
    go = tmp_path / "go"
    idle, busy, parent = _spinner(go, 0.0), _spinner(go, 0.6), _spinner(go, 0.6, child=True)
    grandchildren: list[int] = []
    try:
        _until(lambda: len(cpu.descendants(parent.pid)) == 1, "the grandchild to start")
        meter = cpu.CpuMeter({"idle": cpu.Group(idle.pid), "busy": cpu.Group(busy.pid),
                              "tree": cpu.Group(parent.pid, tree=True), "root_only": cpu.Group(parent.pid)}).start()
        go.touch()
        grandchildren += cpu.descendants(parent.pid)
        grandchild = grandchildren[0]
        _until(lambda: cpu.cpu_seconds(busy.pid) >= 0.6 and cpu.cpu_seconds(grandchild) >= 0.6, "the spinners")
        spent = meter.stop()
        # CPU seconds, not wall time: each spinner burns 0.6 s of its own CPU inside the window, whatever
        # the load; its start-up (interpreter, imports) was spent before the window opened.
        assert 0.5 < spent["busy"] < 0.9, spent  # 0.6 s, read in 10 ms clock ticks
        assert 0.5 < spent["tree"] < 0.9, spent
        assert spent["idle"] < 0.1 and spent["root_only"] < 0.1, spent  # waiting costs nothing
        assert busy.pid not in cpu.descendants(parent.pid)
        assert cpu.tree_cpu_seconds([parent.pid]) >= cpu.cpu_seconds(grandchild) >= 0.6
    finally:
        for pid in grandchildren:  # by PID: the parent's kill does not reach it
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for p in (idle, busy, parent):
            p.kill()
            p.wait(10)


def test_per_run_milliseconds_and_a_total_over_chosen_groups() -> None:
    got = cpu.per_run_ms({"broker": 2.0, "planner": 1.0, "bench_client": 0.5}, 100, total_of=["broker", "planner"])
    assert got == {"broker": 20.0, "planner": 10.0, "bench_client": 5.0, "total": 30.0}
    assert cpu.per_run_ms({"x": 1.0}, 0) == {"x": 1000.0, "total": 1000.0}  # no runs: per one, not a crash


def _point(side_cpu: dict[str, float], rps: float) -> dict:
    return {"mode": "closed loop", "concurrency": 8, "runs": 100, "errors": 0, "seconds": 10.0, "runs_per_s": rps,
            "steps_per_s": 3 * rps, "p50_ms": 10.0, "p99_ms": 20.0, "cpu_ms_per_run": side_cpu}


def test_the_peers_headline_and_report_say_where_a_runs_cpu_goes() -> None:
    top = headline(pair_points([_point({"dbos_process": 6.0, "postgres": 4.0, "total": 10.0}, 100.0)],
                               [_point({"broker": 20.0, "planner": 15.0, "bench_client": 9.0, "total": 35.0}, 30.0)]))
    assert top["mesh_cpu_per_run_over_dbos"] == 3.5
    assert top["mesh"]["cpu_ms_per_run"]["broker"] == 20.0
    text = "\n".join(bench_run._cpu_lines(top))
    assert "DBOS 10.0 (dbos_process 6.0, postgres 4.0;" in text
    assert "mesh 35.0 (broker 20.0, planner 15.0, bench_client 9.0;" in text
    assert "3.5x DBOS's" in text and "200 for DBOS, 57 for the mesh" in text
    assert bench_run._cpu_lines({"dbos": {}, "mesh": {}}) == []  # an older results.json: no line
