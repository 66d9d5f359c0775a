"""The embedded stack supervises its services like Kubernetes (restart on exit with
CrashLoopBackOff, restarts and last exit code recorded and shown by ``aios status``), and
its Redis comes back with its data after a kill -9 (append-only file, fsync every second)."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import redis

from infra.stack import REPO, Ports, Stack, procs, supervisor, wait_serving
from tests.conftest import wait_for
from tools.aios import render
from tools.aios.cli import main as aios
from tools.aios.clients import Check

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def test_backoff_doubles_from_one_second_caps_at_thirty_and_resets_after_a_healthy_minute() -> None:
    backoff = supervisor.Backoff()
    assert [backoff.delay_after(0.5) for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert backoff.delay_after(59.0) == 30  # not healthy long enough
    assert backoff.delay_after(60.0) == 1  # a healthy run resets it
    assert backoff.delay_after(3.0) == 2


# Exits with 3 on its first two runs (counted in a file), then stays up until signalled.
_FLAKY = """
import pathlib, sys, time
runs = pathlib.Path(sys.argv[1])
n = int(runs.read_text()) if runs.exists() else 0
runs.write_text(str(n + 1))
if n < 2:
    sys.exit(3)
for _ in range(6000):
    time.sleep(0.1)
"""


def test_supervisor_restarts_an_exiting_process_with_backoff_and_records_restarts_and_exit_codes(
        tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    counter = tmp_path / "runs"
    spec = supervisor.ServiceSpec("flaky", [sys.executable, "-c", _FLAKY, str(counter)])
    supervisor.write_spec(run_dir, [spec], log_dir=run_dir / "logs", cwd=REPO)
    sup = procs.spawn("supervisor", [sys.executable, "-m", "infra.stack.supervisor", str(run_dir)],
                      env=dict(os.environ), log_dir=run_dir / "logs", cwd=REPO)
    try:
        def state() -> supervisor.ServiceState | None:
            return supervisor.read_state(run_dir).get("flaky")

        # Two quick exits (code 3): restarted after 1 s, then 2 s; the third run stays up.
        first = wait_for(lambda: (s := state()) and s.restarts == 2 and s.state == "running"
                         and counter.exists() and counter.read_text() == "3" and s,
                         timeout_s=30, message="two restarts, then running (third run)")
        assert first.last_exit == 3
        running = first.proc()
        assert procs.same_process(running)

        procs.kill9(running)  # a crash: the supervisor starts it again, exit -9 recorded
        after = wait_for(lambda: (s := state()) and s.restarts == 3 and s.state == "running" and s, timeout_s=30,
                         message="restarted after kill -9")
        assert after.last_exit == -signal.SIGKILL and after.pid != running.pid
    finally:
        procs.stop(sup, grace_s=20)
    final = state()
    assert final is not None and final.state == "stopped"
    assert not procs.same_process(final.proc()), "the supervisor must stop its services when it stops"


def test_supervised_stack_restarts_a_killed_service_and_aios_status_shows_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    stack = Stack(Ports.fresh(), run_dir=tmp_path / "run", topic_prefix="sup.", supervise=True)
    try:
        stack.start_broker()
        stack.start_redis()
        stack.ensure_topics()
        stack.start_services(("policy",))
        before = stack.supervised()["policy"]
        procs.kill9(before.proc())
        again = wait_for(lambda: (s := stack.supervised()["policy"]).restarts == 1 and s.state == "running" and s,
                         timeout_s=30, message="policy restarted by the supervisor")
        wait_serving(again.proc(), timeout_s=60)
        assert again.last_exit == -signal.SIGKILL

        for key, value in stack.env().items():
            if key.startswith("AIOS_"):
                monkeypatch.setenv(key, value)
        aios(["status", "--json"])  # exit 1: the other services are not running here
        rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
        assert rows["policy"]["up"] and rows["policy"]["restarts"] == 1 and rows["policy"]["last_exit"] == -9
        assert rows["planner"]["restarts"] is None  # not started at all: nothing to report
        aios(["status"])
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("policy"))
        assert line.split()[2:5] == ["UP", "1", "-9"], line
        Stack.attach(stack.run_dir).down()  # what `make down` does, from another process
        assert not procs.same_process(again.proc()), "down must stop supervised services by PID"
        assert not [p.name for p in stack.procs.values() if procs.same_process(p)]
    finally:
        stack.down()


def test_status_table_shows_restarts_and_last_exit_for_supervised_services() -> None:
    checks = [Check("planner", "127.0.0.1:1", True, "SERVING"), Check("broker", "127.0.0.1:2", True, "ok")]
    text = render.status_table(checks, {"planner": supervisor.ServiceState("planner", restarts=4, last_exit=70)})
    header, planner, broker = text.splitlines()
    assert "RESTARTS" in header and "LAST EXIT" in header
    assert planner.split()[2:5] == ["UP", "4", "70"] and broker.split()[2:5] == ["UP", "-", "-"]
    assert "RESTARTS" not in render.status_table(checks)  # nothing supervised: the columns stay away


def test_redis_comes_back_after_kill_9_with_every_write_fsynced_before_it(tmp_path: Path) -> None:
    stack = Stack(Ports.fresh(), run_dir=tmp_path / "run")
    try:
        stack.start_redis()
        client = redis.Redis(host="127.0.0.1", port=stack.ports.redis, socket_timeout=5)
        for i in range(100):
            client.set(f"k{i}", f"v{i}")
        # WAITAOF 1 0: returns once every earlier write of this connection is fsynced to the AOF,
        # i.e. what `appendfsync everysec` guarantees a second later; no sleeping.
        assert client.execute_command("WAITAOF", 1, 0, 5000)[0] == 1
        old = stack.procs["redis"]
        new = stack.restart_redis(crash=True)
        assert new.pid != old.pid and new.port == old.port
        client = redis.Redis(host="127.0.0.1", port=stack.ports.redis, socket_timeout=5)
        assert client.mget([f"k{i}" for i in range(100)]) == [f"v{i}".encode() for i in range(100)]
        client.close()
    finally:
        stack.down()
