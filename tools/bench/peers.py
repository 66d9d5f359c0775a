"""`make bench-peers`: the 3-step no-op workflow on DBOS (PostgreSQL) and on the
mesh, same workload and same concurrency, side by side in one run.

1. PostgreSQL: Debian's server binaries (/usr/lib/postgresql/*/bin). A cluster of
   the bench's own in a temp dir (initdb), on 127.0.0.1 and a free port, fsync on,
   password auth; as the current user, or as the unprivileged system user
   ``aiosbench`` when running as root (PostgreSQL refuses root). Stopped by PID at
   the end (pg_ctl stop -m fast), temp dir removed.
2. DBOS 3.4.0 in its own venv (.cache/peers-venv, tools/bench/peers-requirements.txt;
   it cannot share the mesh's lock). tools/bench/dbos_peer.py runs there: closed loop
   at each concurrency, then a burst, then kill -9 crash recovery.
3. The mesh: the embedded stack, the same closed loop (StartWorkflow, wait until
   final) at each concurrency, then the same burst (tools.bench.mesh_bench.throughput).
4. bench/results.json gets a ``peers`` section (every other key kept) and
   docs/benchmarks.md its Peers section.

Every loop is bounded in count and time; nothing listens beyond loopback."""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import json
import os
import platform
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS = REPO_ROOT / "bench" / "results.json"
PEERS_VENV = REPO_ROOT / ".cache" / "peers-venv"
PEERS_REQS = REPO_ROOT / "tools" / "bench" / "peers-requirements.txt"
DBOS_PEER = REPO_ROOT / "tools" / "bench" / "dbos_peer.py"
BENCH_USER = "aiosbench"
GOAL_MESH_OVER_DBOS = 2.0
DBOS_REFERENCE_CONCURRENCY = 8  # the DBOS reference point (96 runs/s at 8 in flight)
WORKFLOW = "bench-three-step"


# -- pure helpers (unit-tested) --------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile, the same rule as mesh_bench.pct and dbos_peer.pct."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else 0.0


def ratio(mesh: float, dbos: float) -> float | None:
    return mesh / dbos if dbos > 0 else None


def pair_points(dbos_points: list[dict[str, Any]], mesh_points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (mode, concurrency) measured on both sides, with mesh_over_dbos."""
    mesh_by = {(p["mode"], p["concurrency"]): p for p in mesh_points}
    rows = []
    for d in dbos_points:
        m = mesh_by.get((d["mode"], d["concurrency"]))
        if m is None:
            continue
        rows.append({"mode": d["mode"], "concurrency": d["concurrency"], "dbos": d, "mesh": m,
                     "mesh_over_dbos": ratio(m["runs_per_s"], d["runs_per_s"])})
    return rows


def headline(rows: list[dict[str, Any]], concurrency: int = DBOS_REFERENCE_CONCURRENCY) -> dict[str, Any]:
    """The figures results.json names at the top of ``peers``: the closed loop at the issue's
    reference concurrency, else the first row measured."""
    chosen = next((r for r in rows if r["mode"] == "closed loop" and r["concurrency"] == concurrency),
                  rows[0] if rows else None)
    if chosen is None:
        return {}
    keep = ("runs_per_s", "p50_ms", "p99_ms", "runs", "seconds", "concurrency", "mode", "cpu_ms_per_run")
    cpu_d, cpu_m = (chosen[side].get("cpu_ms_per_run", {}).get("total") for side in ("dbos", "mesh"))
    return {"concurrency": chosen["concurrency"], "mode": chosen["mode"],
            "dbos": {k: chosen["dbos"][k] for k in keep if k in chosen["dbos"]},
            "mesh": {k: chosen["mesh"][k] for k in keep if k in chosen["mesh"]},
            "mesh_over_dbos": chosen["mesh_over_dbos"],
            # CPU a run costs, mesh over DBOS: what bounds the ratio of runs/s on a machine of few cores
            "mesh_cpu_per_run_over_dbos": round(cpu_m / cpu_d, 2) if cpu_m and cpu_d else None}


def merge_results(existing: dict[str, Any], peers: dict[str, Any]) -> dict[str, Any]:
    """Read-modify-write: every key already in results.json stays; ``peers`` is replaced whole."""
    return {**existing, "peers": peers}


def load_results(path: Path = RESULTS) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


# -- PostgreSQL: a cluster of the bench's own ------------------------------------------------------------------


def find_postgres_bin() -> Path | None:
    """The newest /usr/lib/postgresql/<major>/bin holding postgres, initdb and pg_ctl."""
    found = []
    for d in glob.glob("/usr/lib/postgresql/*/bin"):
        p = Path(d)
        if all(os.access(p / b, os.X_OK) for b in ("postgres", "initdb", "pg_ctl")):
            with contextlib.suppress(ValueError):
                found.append((int(p.parent.name), p))
    return max(found)[1] if found else None


MISSING_POSTGRES = ("PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/postgres, initdb, pg_ctl).\n"
                    "Install Debian's server package, as root:  apt-get update && apt-get install -y postgresql\n"
                    "(`make bench-peers` does this itself when run as root.)")


def _ensure_bench_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(BENCH_USER)
    except KeyError:
        pass
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", BENCH_USER],
                   check=True, timeout=30)
    print(f"created system user {BENCH_USER} (PostgreSQL refuses to run as root)", flush=True)
    return pwd.getpwnam(BENCH_USER)


class PgCluster:
    """initdb in a temp dir, postgres on 127.0.0.1:<port>, stop by PID, remove the dir."""

    def __init__(self, bin_dir: Path, port: int) -> None:
        self.bin = bin_dir
        self.port = port
        self.password = secrets.token_hex(16)
        self.tmp: Path | None = None
        self.pid: int | None = None
        self.user = None if os.geteuid() != 0 else _ensure_bench_user()
        self.run_as = self.user.pw_name if self.user else pwd.getpwuid(os.geteuid()).pw_name

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres:{self.password}@127.0.0.1:{self.port}/postgres"

    def _run(self, cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
        assert self.tmp is not None
        kwargs: dict[str, Any] = {}
        if self.user is not None:
            kwargs = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
        env = {"PATH": f"{self.bin}:/usr/bin:/bin", "HOME": str(self.tmp), "LC_ALL": "C", "LANG": "C"}
        return subprocess.run(cmd, cwd=self.tmp, env=env, capture_output=True, text=True, timeout=timeout,
                              check=False, **kwargs)

    def _check(self, proc: subprocess.CompletedProcess[str], what: str) -> None:
        if proc.returncode != 0:
            raise RuntimeError(f"{what} failed ({proc.returncode}): {proc.stdout[-2000:]}{proc.stderr[-2000:]}")

    def start(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="aios-bench-pg-"))
        if self.user is not None:
            os.chown(self.tmp, self.user.pw_uid, self.user.pw_gid)
        pwfile, data, sock = self.tmp / "pw", self.tmp / "data", self.tmp / "sock"
        pwfile.write_text(self.password + "\n")
        sock.mkdir()
        if self.user is not None:
            for p in (pwfile, sock):
                os.chown(p, self.user.pw_uid, self.user.pw_gid)
        os.chmod(pwfile, 0o600)
        self._check(self._run([str(self.bin / "initdb"), "-D", str(data), "-U", "postgres", "--pwfile", str(pwfile),
                               "--auth", "scram-sha-256", "-E", "UTF8", "--locale", "C", "--no-instructions"]),
                    "initdb")
        pwfile.unlink()
        with open(data / "postgresql.conf", "a") as conf:
            conf.write("\n# aios bench-peers\n"
                       "listen_addresses = '127.0.0.1'\n"
                       f"port = {self.port}\n"
                       f"unix_socket_directories = '{sock}'\n"
                       "fsync = on\n"
                       "synchronous_commit = on\n"
                       "full_page_writes = on\n"
                       "max_connections = 100\n")
        self._check(self._run([str(self.bin / "pg_ctl"), "-D", str(data), "-l", str(self.tmp / "postgres.log"),
                               "-w", "-t", "60", "start"], timeout=90), "pg_ctl start")
        self.pid = int((data / "postmaster.pid").read_text().split("\n", 1)[0])

    def log_tail(self, n: int = 2000) -> str:
        if self.tmp is None or not (self.tmp / "postgres.log").exists():
            return ""
        return (self.tmp / "postgres.log").read_text(errors="replace")[-n:]

    def stop(self) -> None:
        try:
            if self.pid is not None and self.tmp is not None:
                self._run([str(self.bin / "pg_ctl"), "-D", str(self.tmp / "data"), "-m", "fast", "-w", "-t", "60",
                           "stop"], timeout=90)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and _pid_alive(self.pid):
                    time.sleep(0.1)
                if _pid_alive(self.pid):  # our own postmaster, by PID, only if pg_ctl could not stop it
                    os.kill(self.pid, signal.SIGKILL)
                self.pid = None
        finally:
            if self.tmp is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                self.tmp = None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


@contextlib.contextmanager
def postgres_cluster() -> Iterator[PgCluster]:
    bin_dir = find_postgres_bin()
    if bin_dir is None:
        raise SystemExit(MISSING_POSTGRES)
    from infra.stack.procs import free_port

    cluster = PgCluster(bin_dir, free_port())
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


# -- the DBOS venv -----------------------------------------------------------------------------------------------


def peers_python() -> Path:
    """.cache/peers-venv with tools/bench/peers-requirements.txt installed (re-made when the file changes)."""
    py = PEERS_VENV / "bin" / "python"
    stamp = PEERS_VENV / ".installed"
    digest = hashlib.sha256(PEERS_REQS.read_bytes()).hexdigest()
    if py.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return py
    print(f"installing DBOS into {PEERS_VENV} from {PEERS_REQS.name} ...",
          flush=True)
    base = getattr(sys, "_base_executable", sys.executable)
    if not py.exists():
        subprocess.run([base, "-m", "venv", str(PEERS_VENV)], check=True, timeout=300)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "-r", str(PEERS_REQS)], check=True, timeout=900)
    stamp.write_text(digest)
    return py


# -- DBOS side ---------------------------------------------------------------------------------------------------


def dbos_side(py: Path, url: str, concurrencies: list[int], seconds: float, burst: int,
              recovery_runs: int, pg_pid: int = 0) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="aios-bench-dbos-"))
    try:
        out = work / "bench.json"
        cmd = [str(py), str(DBOS_PEER), "bench", "--url", url, "--out", str(out), "--seconds", str(seconds),
               "--burst", str(burst), "--pg-pid", str(pg_pid), "--concurrency", *map(str, concurrencies)]
        budget = 120 + len(concurrencies) * (seconds + 120) + (240 if burst else 0)
        proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=budget, check=False)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"DBOS bench failed ({proc.returncode}): {proc.stderr[-3000:]}")
        result: dict[str, Any] = json.loads(out.read_text())
        if recovery_runs:
            result["recovery"] = dbos_recovery(py, url, work, recovery_runs)
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def dbos_recovery(py: Path, url: str, work: Path, runs: int) -> dict[str, Any]:
    """kill -9 a DBOS process with `runs` workflows inside their second step (first checkpointed),
    start a fresh process at once; time until the runs complete again."""
    ready, out = work / "ready.json", work / "recover.json"
    with open(work / "crash.log", "wb") as log:
        child = subprocess.Popen([str(py), str(DBOS_PEER), "crash", "--url", url, "--runs", str(runs),
                                  "--ready", str(ready)], cwd=work, stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not ready.exists() and child.poll() is None:
            time.sleep(0.05)
        time.sleep(0.2)  # the ready file is written in one go; let it land
        if not ready.exists():
            raise RuntimeError(f"DBOS crash child never got ready: {(work / 'crash.log').read_text()[-2000:]}")
        inside = json.loads(ready.read_text()).get("inside_step_b", 0)
    finally:
        killed_at = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)  # its own session: the group is this child only
        child.wait(30)
    proc = subprocess.run([str(py), str(DBOS_PEER), "recover", "--url", url, "--ids", str(ready), "--out", str(out)],
                          cwd=work, capture_output=True, text=True, timeout=240, check=False)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"DBOS recover failed ({proc.returncode}): {proc.stderr[-3000:]}")
    r = json.loads(out.read_text())

    def since_kill(key: str) -> float | None:
        return r[key] - killed_at if r.get(key) is not None else None

    return {"runs": r["runs"], "inside_step_2_at_kill": inside, "recovered": r["recovered"],
            "lost_runs": r["runs"] - r["recovered"], "steps_executed_after_crash": r["steps_executed_after_crash"],
            "seconds_until_process_launched": since_kill("launched_mono"),
            "seconds_until_runs_move": since_kill("first_done_mono"),
            "seconds_until_all_recovered": since_kill("all_done_mono"),
            "method": "kill -9 of the DBOS process with every run inside step 2 (step 1 checkpointed); a new "
                      "process started at once; times from the kill (Python start + DBOS launch included)"}


# -- mesh side ---------------------------------------------------------------------------------------------------


def mesh_closed_loop(stack: Any, concurrency: int, seconds: float, tenant: str, max_runs: int = 20000,
                     poll_s: float = 0.005, wait: str = "events") -> dict[str, Any]:
    """C client threads: StartWorkflow, wait until the run is final, start the next. ``wait``: "events"
    reads the run's end from the workflow_events topic (tools/bench/run_events.py), "poll" polls
    GetRun every ``poll_s`` (which loads the planner it measures)."""
    from aiosmesh.v1 import workflow_pb2
    from tools.bench import cpu, mesh_bench, run_events

    stub = mesh_bench._stub(stack)
    watcher = None
    if wait == "events":
        # From the topic's current ends: no run of this point ends before it.
        watcher = run_events.RunEndWatcher(stack.env()["AIOS_KAFKA_BOOTSTRAP"], stack.topic_prefix)
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    start = threading.Barrier(concurrency + 1)
    stop_at = [0.0]

    def client(cid: int) -> None:
        start.wait(60)
        i = 0
        while time.monotonic() < stop_at[0] and i < max_runs:
            t0 = time.perf_counter()
            try:
                run_id = stub.StartWorkflow(workflow_pb2.StartWorkflowRequest(
                    tenant=tenant, workflow=WORKFLOW, input_json=json.dumps({"n": cid * 1_000_000 + i})),
                    timeout=10).run_id
                if watcher is not None:
                    ok = watcher.wait(run_id, timeout_s=60) == "completed"
                else:
                    run = mesh_bench._wait_run(stub, tenant, run_id, timeout_s=60, poll_s=poll_s)
                    ok = run.status == "completed"
            except Exception:
                ok = False
            dt = (time.perf_counter() - t0) * 1000
            with lock:
                if ok:
                    latencies.append(dt)
                else:
                    errors[0] += 1
            i += 1

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(concurrency)]
    for t in threads:
        t.start()
    stop_at[0] = time.monotonic() + seconds
    # Trees: a part's children count as the part (Redis's append-only-file rewrite, a forked helper).
    meter = cpu.CpuMeter({name: cpu.Group(p.pid, tree=True) for name, p in stack.procs.items()}).start()
    client_cpu = time.process_time()
    t0 = time.monotonic()
    start.wait(60)
    for t in threads:
        t.join(seconds + 120)
    elapsed = time.monotonic() - t0
    spent = meter.stop()
    mesh_parts = list(spent)
    spent["bench_client"] = time.process_time() - client_cpu  # StartWorkflow calls and the event watcher
    if watcher is not None:
        watcher.close()
    return {"mode": "closed loop", "concurrency": concurrency, "runs": len(latencies), "errors": errors[0],
            "seconds": elapsed, "runs_per_s": len(latencies) / elapsed, "steps_per_s": 3 * len(latencies) / elapsed,
            "p50_ms": pct(latencies, 0.5), "p99_ms": pct(latencies, 0.99), "wait": wait,
            "cpu_ms_per_run": {**cpu.per_run_ms(spent, len(latencies), total_of=mesh_parts),
                               # DBOS's figure includes its client threads: this one is the like for like
                               "total_with_client": cpu.per_run_ms(spent, len(latencies))["total"]},
            **({"poll_ms": poll_s * 1000} if wait == "poll" else {})}


def mesh_side(concurrencies: list[int], seconds: float, burst: int, warmup: int = 10) -> dict[str, Any]:
    from infra.stack import Ports, Stack
    from tools.bench import mesh_bench

    stamp = int(time.time())
    stack = Stack(Ports.fresh(), run_dir=REPO_ROOT / ".run" / "bench-peers", topic_prefix=f"peers{stamp}.",
                  tenant="bench")
    try:
        stack.up(inference=False)
        mesh_closed_loop(stack, 1, 60.0, tenant="bench", max_runs=warmup)  # warm caches and connections
        points = [mesh_closed_loop(stack, c, seconds, tenant=f"peers-c{c}") for c in concurrencies]
        if burst:
            tp = mesh_bench.throughput(stack, n_runs=burst, tenant="peers-burst", latencies=True)
            last = tp.get("last_finished_s") or tp["seconds"]
            points.append({"mode": "burst", "concurrency": burst, "runs": tp["runs"], "errors": burst - tp["runs"],
                           "seconds": last, "runs_per_s": tp["runs"] / last, "steps_per_s": 3 * tp["runs"] / last,
                           "p50_ms": tp.get("p50_ms", 0.0), "p99_ms": tp.get("p99_ms", 0.0),
                           "seconds_polled": tp["seconds"]})
        return {"points": points}
    finally:
        stack.down()


# -- the run -----------------------------------------------------------------------------------------------------


def run(concurrencies: list[int], seconds: float, burst: int, recovery_runs: int) -> dict[str, Any]:
    py = peers_python()
    print("PostgreSQL: a cluster of the bench's own on 127.0.0.1 (fsync on) ...", flush=True)
    with postgres_cluster() as pg:
        print(f"  {pg.bin.parent.name} on 127.0.0.1:{pg.port}, postmaster PID {pg.pid}, running as {pg.run_as}",
              flush=True)
        print(f"DBOS: 3-step no-op workflow, closed loop at {concurrencies} for {seconds:.0f} s each"
              + (f", burst of {burst}" if burst else "") + (", kill -9 recovery" if recovery_runs else "") + " ...",
              flush=True)
        load_before_dbos = os.getloadavg()[0]
        try:
            dbos = dbos_side(py, pg.url, concurrencies, seconds, burst, recovery_runs, pg.pid or 0)
        except Exception:
            print(pg.log_tail(), file=sys.stderr)
            raise
        dbos["postgres"]["run_as"] = pg.run_as
    print("  PostgreSQL stopped, temp dir removed", flush=True)
    _print_points("DBOS", dbos["points"])
    print(f"mesh: embedded stack, the same workload at {concurrencies}" + (f", burst of {burst}" if burst else "")
          + " ...", flush=True)
    load_before_mesh = os.getloadavg()[0]
    mesh = mesh_side(concurrencies, seconds, burst)
    _print_points("mesh", mesh["points"])
    rows = pair_points(dbos["points"], mesh["points"])
    top = headline(rows)
    return {
        **top,
        "goal_mesh_over_dbos": GOAL_MESH_OVER_DBOS,
        "points": rows,
        "dbos_recovery": dbos.get("recovery"),
        "setup": {
            "dbos": f"dbos {dbos.get('dbos_version')} (own venv, tools/bench/peers-requirements.txt)",
            "postgres": {k: v for k, v in dbos["postgres"].items()},
            "mesh": "embedded stack: tansu broker (memory storage), Redis 8.2 (AOF, fsync every second), "
                    "planner/executor/policy/memory/observability as processes; client: StartWorkflow, then the "
                    "run's end read from the workflow_events topic (closed loop; GetRun polling loaded the "
                    "planner it measured), ingress events (burst)",
            "dbos_client": "the workflow function called in the client thread (closed loop), one thread per run "
                           "(burst); DBOS defaults (system database pool 20)",
            "order": "DBOS first (PostgreSQL stopped after it), then the mesh; one process run",
            "load_average_1m": {"before_dbos": load_before_dbos, "before_mesh": load_before_mesh,
                                "after_mesh": os.getloadavg()[0]},
        },
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores, Python {platform.python_version()}",
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def _print_points(side: str, points: list[dict[str, Any]]) -> None:
    for p in points:
        print(f"  {side:4} {p['mode']:11} c={p['concurrency']:<4} {p['runs_per_s']:7.1f} runs/s  "
              f"p50 {p['p50_ms']:7.1f} ms  p99 {p['p99_ms']:7.1f} ms  ({p['runs']} runs, {p['errors']} errors)",
              flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.peers")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[DBOS_REFERENCE_CONCURRENCY],
                        help="closed-loop clients, each point measured on both sides (default 8)")
    parser.add_argument("--burst", type=int, default=600,
                        help="runs started at once, as `make bench` does for the mesh (0: skip)")
    parser.add_argument("--seconds", type=float, default=20.0, help="closed-loop window per point")
    parser.add_argument("--recovery-runs", type=int, default=12, help="DBOS kill -9 recovery (0: skip)")
    parser.add_argument("--quick", action="store_true", help="smaller counts (a smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.burst, args.recovery_runs = 5.0, min(args.burst, 100), min(args.recovery_runs, 4)
    if find_postgres_bin() is None:
        print(MISSING_POSTGRES, file=sys.stderr)
        return 2
    peers = run(args.concurrency, args.seconds, args.burst, args.recovery_runs)
    results = merge_results(load_results(), peers)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    from tools.bench import run as bench_run

    bench_run.write_report(results)
    print("\n" + bench_run.render_peers(results))
    print(f"written: {RESULTS.relative_to(REPO_ROOT)} (peers), {bench_run.REPORT.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
