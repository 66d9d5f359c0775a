"""Restart the mesh services when they exit, the way Kubernetes restarts a crashed container.

``python -m infra.stack up`` starts this as a process of its own
(``python -m infra.stack.supervisor <run dir>``), because ``up`` itself returns once
everything is SERVING. It is the parent of the five service processes and of the
hot-standby planners (``planner-1``...), so it learns each exit code, and it outlives
the shell that ran ``make up``. A crashed planner does not wait for this restart: its
standby takes over within about 1.5 s and the restarted one stands by in turn.

* Restart policy "Always": a service that exits for any reason is started again (its
  own non-zero exit after a dead consumer loop or a fatal producer error, a crash, a
  kill -9, an operator's SIGTERM by PID).
* Backoff like CrashLoopBackOff: 1 s, 2 s, 4 s ... capped at 30 s; a run of 60 s or more
  counts as healthy and resets it to 1 s.
* State in ``<run dir>/supervisor.json`` (pid, restarts, last exit code and when, per
  service), rewritten atomically on every change: ``aios status`` and
  ``python -m infra.stack status`` show it.
* SIGTERM/SIGINT: stop every service by PID (SIGTERM to its process group, SIGKILL after
  the grace) in reverse start order, then exit 0.

Tests and the chaos tool start the stack without a supervisor: they kill -9 and restart
services themselves and a supervisor would race them (see docs/DECISIONS.md).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from infra.stack import procs

SPEC_FILE = "supervisor-spec.json"
STATE_FILE = "supervisor.json"
MAX_LIFETIME_S = 30 * 24 * 3600.0  # a bound on the loop; far beyond any embedded-stack session


@dataclass
class ServiceSpec:
    """How to start one supervised process."""

    name: str
    cmd: list[str]
    port: int = 0
    env: dict[str, str] = field(default_factory=dict)  # on top of the supervisor's own environment


@dataclass
class Backoff:
    """CrashLoopBackOff: ``base_s * 2**n`` after the n-th quick exit in a row, capped; reset by a healthy run."""

    base_s: float = 1.0
    cap_s: float = 30.0
    healthy_after_s: float = 60.0
    quick_exits: int = 0

    def delay_after(self, ran_for_s: float) -> float:
        """The wait before the next start, given how long the process just ran."""
        if ran_for_s >= self.healthy_after_s:
            self.quick_exits = 0
        delay = min(self.cap_s, self.base_s * 2.0**self.quick_exits)
        self.quick_exits += 1
        return delay


@dataclass
class ServiceState:
    """What ``supervisor.json`` says about one service."""

    name: str
    state: str = "starting"  # running | backoff | stopped
    pid: int = 0
    cmd: list[str] = field(default_factory=list)
    log: str = ""
    port: int = 0
    restarts: int = 0
    last_exit: int | None = None  # negative: killed by that signal (-9 = SIGKILL)
    last_exit_at: float | None = None  # wall clock, seconds
    next_start_in_s: float = 0.0

    def proc(self) -> procs.Proc:
        return procs.Proc(name=self.name, pid=self.pid, cmd=self.cmd, log=self.log, port=self.port)


class _Child:
    def __init__(self, spec: ServiceSpec, backoff: Backoff) -> None:
        self.spec, self.backoff = spec, backoff
        self.status = ServiceState(spec.name, cmd=spec.cmd, port=spec.port)
        self.proc: procs.Proc | None = None
        self.popen: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0  # monotonic
        self.start_at = 0.0  # monotonic: when the next start is due


class Supervisor:
    """Keeps each spec'd process running; ``tick()`` does one pass (reap, restart, save)."""

    def __init__(self, specs: Sequence[ServiceSpec], run_dir: Path, *, log_dir: Path, cwd: Path | None = None,
                 backoff: Callable[[], Backoff] = Backoff, clock: Callable[[], float] = time.monotonic) -> None:
        self.run_dir, self.log_dir, self.cwd, self.clock = run_dir, log_dir, cwd, clock
        self.children = [_Child(s, backoff()) for s in specs]

    def start(self) -> None:
        for child in self.children:
            self._start(child)
        self.save()

    def tick(self) -> None:
        now, changed = self.clock(), False
        for child in self.children:
            code = child.popen.poll() if child.popen is not None else None
            if code is not None and child.proc is not None:
                procs.kill9(child.proc)  # anything left in its process group goes with it
                delay = child.backoff.delay_after(now - child.started_at)
                child.popen, child.start_at = None, now + delay
                child.status.last_exit, child.status.last_exit_at = code, time.time()
                child.status.state, child.status.next_start_in_s = "backoff", round(delay, 1)
                print(f"supervisor: {child.spec.name} (pid {child.proc.pid}) exited with {code}; "
                      f"restarting in {delay:.0f}s", flush=True)
                changed = True
            if child.popen is None and child.status.state == "backoff" and now >= child.start_at:
                child.status.restarts += 1
                self._start(child)
                changed = True
        if changed:
            self.save()

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop every service by PID, last started first."""
        for child in reversed(self.children):
            if child.popen is not None and child.proc is not None:
                procs.stop(child.proc, grace_s=grace_s)
                child.status.last_exit = child.popen.poll()
            child.popen = None
            child.status.state = "stopped"
        self.save()

    def save(self) -> None:
        write_state(self.run_dir, [c.status for c in self.children])

    def _start(self, child: _Child) -> None:
        env = {**os.environ, **child.spec.env}
        child.proc, child.popen = procs.start(child.spec.name, child.spec.cmd, env=env, log_dir=self.log_dir,
                                              port=child.spec.port, cwd=self.cwd)
        child.started_at = self.clock()
        child.status.pid, child.status.log, child.status.state = child.proc.pid, child.proc.log, "running"
        child.status.next_start_in_s = 0.0


# -- files -------------------------------------------------------------------------------------------
def write_spec(run_dir: Path, specs: Sequence[ServiceSpec], *, log_dir: Path, cwd: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_json(run_dir / SPEC_FILE, {"log_dir": str(log_dir), "cwd": str(cwd),
                                      "services": [asdict(s) for s in specs]})


def write_state(run_dir: Path, states: Sequence[ServiceState]) -> None:
    _write_json(run_dir / STATE_FILE, {"supervisor_pid": os.getpid(), "updated_at": time.time(),
                                       "services": {s.name: asdict(s) for s in states}})


def read_state(run_dir: Path) -> dict[str, ServiceState]:
    """The supervised services of a run dir (empty when nothing is supervised there)."""
    try:
        data = json.loads((run_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {name: ServiceState(**s) for name, s in data.get("services", {}).items()}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    # Written whole, then renamed: a reader never sees half a file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    run_dir = Path((argv if argv is not None else sys.argv[1:])[0])
    spec = json.loads((run_dir / SPEC_FILE).read_text())
    supervisor = Supervisor([ServiceSpec(**s) for s in spec["services"]], run_dir,
                            log_dir=Path(spec["log_dir"]), cwd=Path(spec["cwd"]))
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda sig, _f: stopping.append(sig))
    signal.signal(signal.SIGINT, lambda sig, _f: stopping.append(sig))
    supervisor.start()
    print(f"supervisor: watching {', '.join(c.spec.name for c in supervisor.children)}", flush=True)
    deadline = time.monotonic() + MAX_LIFETIME_S
    while not stopping and time.monotonic() < deadline:
        supervisor.tick()
        time.sleep(0.2)
    print("supervisor: stopping every service", flush=True)
    supervisor.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
