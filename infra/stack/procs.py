"""Start and stop local processes by PID. Each child gets its own process
group so that stopping it also stops whatever it spawned; nothing here ever
matches processes by name."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class Proc:
    name: str
    pid: int
    cmd: list[str]
    log: str
    port: int = 0

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        # A zombie child still answers kill(0); treat it as gone.
        try:
            with open(f"/proc/{self.pid}/stat") as fh:
                return fh.read().split(") ", 1)[1][0] != "Z"
        except OSError:
            return False


def spawn(name: str, cmd: list[str], *, env: dict[str, str], log_dir: Path, port: int = 0,
          cwd: Path | None = None) -> Proc:
    return start(name, cmd, env=env, log_dir=log_dir, port=port, cwd=cwd)[0]


def start(name: str, cmd: list[str], *, env: dict[str, str], log_dir: Path, port: int = 0,
          cwd: Path | None = None) -> tuple[Proc, subprocess.Popen[bytes]]:
    """Start ``cmd`` in a session of its own (so stopping its group stops what it spawned), output
    appended to ``<log_dir>/<name>.log``. The Popen is for a parent that wants the exit code: keep
    it, since Python reaps dropped Popen objects of running children on the next Popen."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with open(log_path, "ab") as out:
        child = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 cwd=cwd, start_new_session=True)
    return Proc(name=name, pid=child.pid, cmd=cmd, log=str(log_path), port=port), child


def same_process(proc: Proc) -> bool:
    """Whether ``proc.pid`` still runs ``proc.cmd`` (a recorded PID may have been reused since)."""
    try:
        with open(f"/proc/{proc.pid}/cmdline", "rb") as fh:
            argv = [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
    except OSError:
        return False
    return proc.alive() and argv == list(proc.cmd)


def stop(proc: Proc, *, grace_s: float = 10.0) -> None:
    """SIGTERM the process group, wait for a graceful exit, then SIGKILL it."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        except PermissionError:
            os.kill(proc.pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            _reap(proc.pid)
            if not proc.alive() and not _group_alive(proc.pid):
                return
            time.sleep(0.05)


def kill9(proc: Proc) -> None:
    """Crash the process (chaos tests): SIGKILL to the whole group, no grace."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (proc.alive() or _group_alive(proc.pid)):
        _reap(proc.pid)
        time.sleep(0.02)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _group_alive(pgid: int) -> bool:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().split(") ", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
        except (OSError, IndexError, ValueError):
            continue
    return False


def wait_port(port: int, *, timeout_s: float, proc: Proc | None = None, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited during start-up; see {proc.log}")
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{proc.name if proc else 'port'} not listening on {host}:{port} after {timeout_s}s"
                       + (f"; see {proc.log}" if proc else ""))


def free_port(low: int = 12000, high: int = 20000) -> int:
    """A free loopback port below the kernel's ephemeral range (32768+): a port from bind(0)
    comes from that range, and an outgoing connection may take it before our service binds it."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(low, high)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise OSError(f"no free port in {low}-{high}")


def save(path: Path, procs: list[Proc], extra: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"procs": [asdict(p) for p in procs], **extra}, indent=2))


def load(path: Path) -> tuple[list[Proc], dict[str, object]]:
    if not path.exists():
        return [], {}
    data = json.loads(path.read_text())
    return [Proc(**p) for p in data.pop("procs", [])], data
