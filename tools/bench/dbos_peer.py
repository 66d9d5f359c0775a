"""The DBOS side of `make bench-peers`: a 3-step no-op workflow on DBOS Transact
(PostgreSQL system database), measured the same way as the mesh's.

Runs inside its own venv (.cache/peers-venv, locked by
tools/bench/peers-requirements.txt: dbos 3.4.0 needs croniter>=6.2.4, the mesh's
lock holds croniter<6), so it imports nothing from the project but tools/bench/cpu.py
(standard library only, loaded by path beside this file). tools/bench/peers.py
starts it as a subprocess, and reads the JSON it writes to --out.

Modes:
  bench    closed loop: C client threads each run the workflow, wait for its
           result and start the next, for --seconds (bounded by --max-runs);
           then a burst: --burst runs started at once, time until all finished.
  crash    start --runs workflows whose second step blocks, write --ready once
           every run is inside that step (its first step checkpointed), then wait
           for the parent's kill -9 (bounded: exits by itself after 120 s).
  recover  launch (DBOS recovers the pending runs of its executor at launch) and
           time until every run in --ids is SUCCESS; count the steps executed.

Every loop is bounded in count and time."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from typing import Any

from dbos import DBOS, DBOSConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cpu  # noqa: E402  (tools/bench/cpu.py: standard library only)

APP_VERSION = "aios-bench-peers-1"  # fixed, so the recovering process owns the crashed runs
_block = threading.Event()  # set in crash mode: step b waits until the process is killed
_lock = threading.Lock()
_steps_executed = 0
_inside_b = 0


def _count() -> None:
    global _steps_executed
    with _lock:
        _steps_executed += 1


@DBOS.step()
def noop_a() -> None:
    _count()


@DBOS.step()
def noop_b() -> None:
    global _inside_b
    _count()
    if _block.is_set():
        with _lock:
            _inside_b += 1
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # killed long before this ends
            time.sleep(0.05)
        os._exit(3)


@DBOS.step()
def noop_c() -> None:
    _count()


@DBOS.workflow()
def three_step(n: int) -> int:
    noop_a()
    noop_b()
    noop_c()
    return n


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else 0.0


def _launch(url: str) -> None:
    config: DBOSConfig = {"name": "aios-bench-peers", "system_database_url": url,
                          "application_version": APP_VERSION, "log_level": "WARNING"}
    DBOS(config=config)
    DBOS.launch()


def _server_facts(url: str) -> dict[str, str]:
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), connect_timeout=10) as conn:
        def show(what: str) -> str:
            row = conn.execute(f"SHOW {what}").fetchone()
            return str(row[0]) if row else ""

        return {"server_version": show("server_version"), "fsync": show("fsync"),
                "synchronous_commit": show("synchronous_commit"), "listen_addresses": show("listen_addresses"),
                "wal_sync_method": show("wal_sync_method")}


def closed_loop(concurrency: int, seconds: float, max_runs: int, pg_pid: int = 0) -> dict[str, Any]:
    """``pg_pid``: the postmaster, whose tree's CPU is counted with this process's (0: not counted)."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    start = threading.Barrier(concurrency + 1)
    stop_at = [0.0]

    def client(cid: int) -> None:
        start.wait(60)
        i = 0
        while time.monotonic() < stop_at[0] and len(latencies) < max_runs and i < max_runs:
            t0 = time.perf_counter()
            try:
                three_step(cid * 1_000_000 + i)
            except Exception:
                with lock:
                    errors[0] += 1
                i += 1
                continue
            dt = (time.perf_counter() - t0) * 1000
            with lock:
                latencies.append(dt)
            i += 1

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(concurrency)]
    for t in threads:
        t.start()
    stop_at[0] = time.monotonic() + seconds
    meter = cpu.CpuMeter({"postgres": cpu.Group(pg_pid, tree=True)} if pg_pid else {}).start()
    own = time.process_time()
    t0 = time.monotonic()
    start.wait(60)
    for t in threads:
        t.join(seconds + 120)
    elapsed = time.monotonic() - t0
    spent = {"dbos_process": time.process_time() - own, **meter.stop()}
    return {"mode": "closed loop", "concurrency": concurrency, "runs": len(latencies), "errors": errors[0],
            "seconds": elapsed, "runs_per_s": len(latencies) / elapsed, "steps_per_s": 3 * len(latencies) / elapsed,
            "p50_ms": pct(latencies, 0.5), "p99_ms": pct(latencies, 0.99),
            "cpu_ms_per_run": cpu.per_run_ms(spent, len(latencies))}


def burst(n_runs: int, timeout_s: float = 180) -> dict[str, Any]:
    """n_runs workflows started at once, one client thread each; latency from the burst's start."""
    done_at: list[float] = []
    errors = [0]
    lock = threading.Lock()
    start = threading.Barrier(n_runs + 1)
    t0 = [0.0]

    def client(i: int) -> None:
        start.wait(120)
        try:
            three_step(i)
        except Exception:
            with lock:
                errors[0] += 1
            return
        with lock:
            done_at.append(time.perf_counter())

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n_runs)]
    for t in threads:
        t.start()
    t0[0] = time.perf_counter()
    start.wait(120)
    deadline = time.monotonic() + timeout_s
    for t in threads:
        t.join(max(0.1, deadline - time.monotonic()))
    lat = [(d - t0[0]) * 1000 for d in done_at]
    elapsed = max(lat) / 1000 if lat else timeout_s
    return {"mode": "burst", "concurrency": n_runs, "runs": len(lat), "errors": errors[0], "seconds": elapsed,
            "runs_per_s": len(lat) / elapsed, "steps_per_s": 3 * len(lat) / elapsed,
            "p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99)}


def mode_bench(args: argparse.Namespace) -> dict[str, Any]:
    _launch(args.url)
    try:
        facts = _server_facts(args.url)
        for i in range(args.warmup):  # connections, prepared paths, schema caches
            three_step(i)
        points = [closed_loop(c, args.seconds, args.max_runs, args.pg_pid) for c in args.concurrency]
        if args.burst:
            points.append(burst(args.burst))
        return {"postgres": facts, "points": points}
    finally:
        DBOS.destroy(destroy_registry=False)


def mode_crash(args: argparse.Namespace) -> dict[str, Any]:
    _launch(args.url)
    _block.set()
    ids = [f"crash-{os.getpid()}-{i}" for i in range(args.runs)]
    from dbos import SetWorkflowID

    for i, wid in enumerate(ids):
        with SetWorkflowID(wid):
            DBOS.start_workflow(three_step, i)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _inside_b < args.runs:
        time.sleep(0.01)
    with open(args.ready, "w") as fh:
        json.dump({"ids": ids, "inside_step_b": _inside_b}, fh)
    time.sleep(120)  # the parent kills this process
    return {}


def mode_recover(args: argparse.Namespace) -> dict[str, Any]:
    """Times are CLOCK_MONOTONIC (system-wide on Linux), so the parent can measure from its kill -9."""
    started = time.monotonic()
    with open(args.ids) as fh:
        ids = json.load(fh)["ids"]
    _launch(args.url)  # recovery of this executor's pending runs starts here
    launched = time.monotonic()
    try:
        first = None
        done: set[str] = set()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(done) < len(ids):
            for status in DBOS.list_workflows(workflow_ids=ids):
                if status.status == "SUCCESS" and status.workflow_id not in done:
                    done.add(status.workflow_id)
                    first = first if first is not None else time.monotonic()
            time.sleep(0.01)
        return {"runs": len(ids), "recovered": len(done), "steps_executed_after_crash": _steps_executed,
                "process_started_mono": started, "launched_mono": launched, "first_done_mono": first,
                "all_done_mono": time.monotonic() if len(done) == len(ids) else None}
    finally:
        DBOS.destroy(destroy_registry=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dbos_peer.py")
    parser.add_argument("mode", choices=["bench", "crash", "recover"])
    parser.add_argument("--url", required=True, help="postgresql+psycopg://user:pass@127.0.0.1:PORT/db")
    parser.add_argument("--out", help="write the JSON result here")
    parser.add_argument("--concurrency", type=int, nargs="*", default=[8])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--max-runs", type=int, default=20000)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--burst", type=int, default=0)
    parser.add_argument("--runs", type=int, default=12)
    parser.add_argument("--pg-pid", type=int, default=0, help="bench: the postmaster, to count PostgreSQL's CPU")
    parser.add_argument("--ready", help="crash: file written once every run is inside step b")
    parser.add_argument("--ids", help="recover: the ready file of the crashed process")
    args = parser.parse_args(argv)
    result = {"bench": mode_bench, "crash": mode_crash, "recover": mode_recover}[args.mode](args)
    result["dbos_version"] = _version()
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)
    else:
        print(json.dumps(result))
    return 0


def _version() -> str:
    from importlib.metadata import version

    return version("dbos")


if __name__ == "__main__":
    sys.exit(main())
