"""A private Ray cluster on loopback, owned by one inference process.

Why ``ray start`` and not ``ray.init()``: plain ``ray.init()`` picks random
ports for the GCS, raylet, object manager, agents and workers; ``ray start``
lets every one of them be pinned, so two stacks with different port bases
never collide. Without ``--block``, ``ray start`` does not spawn Ray's reaper
and does not call ``setpgrp``, so the daemons it launches stay in this
process's process group (the launcher starts us with ``start_new_session``):
killing our group kills Ray too. We also make ourselves a child subreaper, so
the daemons orphaned when the ``ray start`` CLI exits are re-parented to us and
we can reap them instead of leaving zombies (PID 1 here may not reap).

Stopping never uses ``ray stop`` (it kills every Ray process on the machine):
every Ray process this cluster started carries its unique temp dir in its
command line, so we find them by walking /proc and signal those PIDs only."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

PORT_SPAN = 100  # ports a cluster uses from its base: base .. base+99
# Ray builds unix socket paths as <temp>/session_<date>_<pid>/sockets/plasma_store
# (~62 chars after the temp dir); Linux caps socket paths at 107 bytes.
MAX_TEMP_DIR_CHARS = 45
_PR_SET_CHILD_SUBREAPER = 36


class RayStartFailed(RuntimeError):
    """The local Ray cluster could not be started; the message says why."""


@dataclass(frozen=True)
class RayPorts:
    """Every port Ray opens, derived from one base so stacks never overlap."""

    base: int

    def named(self) -> dict[str, int]:
        b = self.base
        return {"gcs": b, "object_manager": b + 1, "node_manager": b + 2, "ray_client_server": b + 3,
                "dashboard": b + 4, "dashboard_agent_listen": b + 5, "dashboard_agent_grpc": b + 6,
                "runtime_env_agent": b + 7, "metrics_export": b + 8, "autoscaler_metric": b + 9,
                "dashboard_metric": b + 10}

    @property
    def worker_range(self) -> tuple[int, int]:
        return self.base + 20, self.base + PORT_SPAN - 1


def temp_dir_for(run_dir: Path, base: int) -> Path:
    """``<run_dir>/ray-<base>``, or a short path under /tmp when that is too long for Ray's sockets."""
    preferred = (run_dir / f"ray-{base}").resolve()
    if len(str(preferred)) <= MAX_TEMP_DIR_CHARS:
        return preferred
    return Path(f"/tmp/aios-ray-{os.getuid()}-{base}")


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def become_subreaper() -> bool:
    """Adopt orphaned descendants (Linux only) so we can reap them."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
    except OSError:
        return []


class LocalRayCluster:
    """Start, find and stop the Ray processes of one temp dir."""

    def __init__(self, ports: RayPorts, temp_dir: Path, *, num_cpus: int, env: dict[str, str]) -> None:
        self.ports = ports
        self.temp_dir = temp_dir
        self.num_cpus = num_cpus
        self.env = env
        self.core_pids: dict[str, int] = {}
        self.daemon_pids: list[int] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.ports.base}"

    def _start_command(self) -> list[str]:
        p = self.ports.named()
        low, high = self.ports.worker_range
        return [sys.executable, "-m", "ray.scripts.scripts", "start", "--head",
                "--node-ip-address=127.0.0.1", f"--port={p['gcs']}",
                f"--object-manager-port={p['object_manager']}", f"--node-manager-port={p['node_manager']}",
                f"--ray-client-server-port={p['ray_client_server']}", f"--min-worker-port={low}",
                f"--max-worker-port={high}", "--include-dashboard=false", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={p['dashboard']}",
                f"--dashboard-agent-listen-port={p['dashboard_agent_listen']}",
                f"--dashboard-agent-grpc-port={p['dashboard_agent_grpc']}",
                f"--runtime-env-agent-port={p['runtime_env_agent']}",
                f"--metrics-export-port={p['metrics_export']}", f"--temp-dir={self.temp_dir}",
                f"--num-cpus={self.num_cpus}", "--object-store-memory=268435456",
                "--disable-usage-stats", "--log-style=record"]

    def _process_env(self) -> dict[str, str]:
        p = self.ports.named()
        env = dict(self.env)
        env.update({
            # Without this Ray swaps 127.0.0.1 for the host's interface address.
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
            "AUTOSCALER_METRIC_PORT": str(p["autoscaler_metric"]),
            "DASHBOARD_METRIC_PORT": str(p["dashboard_metric"]),
        })
        return env

    def check_ports(self, extra: dict[str, int], wait_s: float = 5.0) -> None:
        """Fail with a clear message, before Ray does cryptically, if a port is
        taken; waits briefly since sockets of just-killed processes close late."""
        deadline = time.monotonic() + wait_s
        while True:
            busy = {name: port for name, port in {**self.ports.named(), **extra}.items() if port_in_use(port)}
            if not busy or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if busy:
            listed = ", ".join(f"{name}={port}" for name, port in busy.items())
            raise RayStartFailed(f"ports already in use: {listed}; pick another AIOS_RAY_PORT_BASE / "
                                 "AIOS_INFERENCE_PORT or stop whatever holds them")

    def start(self, timeout_s: float = 90.0) -> None:
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(self._start_command(), env=self._process_env(), capture_output=True, text=True,
                              timeout=timeout_s, stdin=subprocess.DEVNULL, check=False)
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
            raise RayStartFailed(f"`ray start` exited with {done.returncode}:\n{tail}")
        started = self.pids()
        self.core_pids = {name: pid for pid in started for name in ("gcs_server", "raylet")
                          if any(a.endswith("/" + name) or a == name for a in _cmdline(pid)[:1])}
        # Daemons share our process group (workers make their own): when the
        # launcher signals the group, they get the SIGTERM too.
        self.daemon_pids = [pid for pid in started if _pgid(pid) == os.getpgrp()]

    def pids(self) -> list[int]:
        """Every live process of this cluster: our descendants (the daemons
        ``ray start`` left are adopted by us as subreaper; workers are the
        raylet's children) plus anything naming our temp dir (leftovers of a
        previous owner), and their descendants. Workers rename themselves
        (``ray::IDLE``), so the command line alone would miss them."""
        own = os.getpid()
        marker = str(self.temp_dir)
        gcs = f"=127.0.0.1:{self.ports.base}"  # the Ray client server names the GCS, not the temp dir
        children: dict[int, list[int]] = {}
        roots = {own}
        for pid, ppid in _process_table():
            children.setdefault(ppid, []).append(pid)
            args = _cmdline(pid)
            if pid != own and any(a == marker or a.endswith(("=" + marker, gcs)) or marker + "/" in a
                                  for a in args):
                roots.add(pid)
        found: set[int] = set()
        stack = list(roots)
        while stack:
            pid = stack.pop()
            for child in children.get(pid, []):
                if child not in found:
                    found.add(child)
                    stack.append(child)
        found |= roots
        found.discard(own)
        return sorted(pid for pid in found if _alive(pid))

    def daemons_signalled(self) -> bool:
        """Some daemon of our process group already exited: the stop signal went
        to the whole group, the cluster is coming down by itself, and a graceful
        Serve shutdown can only time out."""
        return any(not _alive(pid) for pid in self.daemon_pids)

    def core_alive(self) -> bool:
        """GCS and raylet still running (checked by the watchdog)."""
        return bool(self.core_pids) and all(_alive(pid) for pid in self.core_pids.values())

    def stop(self, grace_s: float = 3.0) -> list[int]:
        """SIGTERM every process of the cluster, SIGKILL what is left after
        ``grace_s``; returns the PIDs still alive afterwards (should be none)."""
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 3.0)):
            pids = self.pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and self.pids():
                reap_children()
                time.sleep(0.05)
        reap_children()
        return self.pids()


def _process_table() -> list[tuple[int, int]]:
    """(pid, parent pid) of every process, from /proc."""
    table = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                table.append((int(entry), int(fh.read().rsplit(") ", 1)[1].split()[1])))
        except (OSError, IndexError, ValueError):
            continue
    return table


def _pgid(pid: int) -> int:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return -1


def _alive(pid: int) -> bool:
    """Running, or a zombie leader whose other threads are still exiting (and
    may still hold sockets): only a zombie with no live thread counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            if fh.read().rsplit(") ", 1)[1][0] != "Z":
                return True
        return len(os.listdir(f"/proc/{pid}/task")) > 1
    except (OSError, IndexError):
        return False


def reap_children() -> None:
    """Collect exited children (the adopted Ray daemons) so none stays a zombie."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
