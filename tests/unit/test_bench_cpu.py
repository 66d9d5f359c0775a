"""tools/bench/cpu.py: CPU seconds per group of processes, read from /proc, on real processes."""

from __future__ import annotations

import subprocess
import sys
import time

from tools.bench import cpu
from tools.bench import run as bench_run
from tools.bench.peers import headline, pair_points

_SPIN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\ntime.sleep(30)\n"


def _spinner(seconds: float, *, child: bool = False) -> subprocess.Popen[bytes]:
    """A process that burns ``seconds`` of CPU then sleeps; with ``child``, it does so in a grandchild."""
    code = _SPIN.format(s=seconds)
    if child:
        code = f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {code!r}])\n"
    return subprocess.Popen([sys.executable, "-c", code])


def _wait_cpu(pids: list[int], at_least: float, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while sum(cpu.cpu_seconds(p) for p in pids) < at_least and time.monotonic() < deadline:
        time.sleep(0.05)


def test_the_meter_counts_what_a_group_spent_in_the_window_and_a_tree_its_descendants() -> None:
    idle, busy, parent = _spinner(0.0), _spinner(0.6), _spinner(0.6, child=True)
    try:
        meter = cpu.CpuMeter({"idle": cpu.Group(idle.pid), "busy": cpu.Group(busy.pid),
                              "tree": cpu.Group(parent.pid, tree=True), "root_only": cpu.Group(parent.pid)}).start()
        _wait_cpu([busy.pid], 0.55)
        deadline = time.monotonic() + 20
        while not cpu.descendants(parent.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        _wait_cpu(cpu.descendants(parent.pid), 0.55)
        spent = meter.stop()
        assert spent["idle"] < 0.2
        assert 0.3 < spent["busy"] < 1.5  # the window caught most of its 0.6 s
        assert 0.3 < spent["tree"] < 1.5  # the grandchild appeared in the window: counted from zero
        assert spent["root_only"] < 0.2  # the parent itself only waits
        assert cpu.descendants(parent.pid) and busy.pid not in cpu.descendants(parent.pid)
    finally:
        for p in (idle, busy, parent):
            p.kill()
            p.wait(10)
    assert cpu.cpu_seconds(busy.pid) == 0.0  # gone (reaped): nothing more to count


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
