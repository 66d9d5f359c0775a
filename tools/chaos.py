"""Chaos for the embedded mesh, shared by the chaos tests and the recovery benchmark:
order-recovery traffic, the people who answer approvals, a bounded chaos monkey that
kill -9s services, Redis and inference at random moments and restarts them, and the
checks every chaos run ends with (one final run per event, dead letters replayed).
The sandbox API counts every effect per key."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx

from aiosmesh.v1 import workflow_pb2, workflow_pb2_grpc
from infra.stack import SERVICES, Stack
from services.common.kafka import MeshProducer, new_event_id, now_ms
from tools.bench import cpu
from tools.sandbox.client import SandboxClient

FINAL = {"completed", "failed", "cancelled", "compensation_failed"}
# What a crash can hit: every mesh service and Redis (restarted on its port from its AOF);
# "inference" (the Ray cluster with its Serve replicas) may be added where a workload uses it.
TARGETS = (*SERVICES, "redis")
# Words of an error that says the infrastructure failed a run rather than the business.
INFRA_WORDS = ("steptimeout", "unavailable", "connection", "redis")


@dataclass(frozen=True)
class Order:
    order_id: str
    customer_id: str
    sku: str
    quantity: int
    amount_cents: int
    refund_cents: int  # what the delay refund asks for; above the order amount -> 422 -> compensation


def make_orders(n: int, seed: int = 3, bad_share: float = 0.05) -> list[Order]:
    rng = random.Random(seed)
    orders = []
    for i in range(n):
        amount = rng.choice([1500, 4200, 8900, 12500, 23000])  # cents; 125.00 and 230.00 need finance approval
        bad = rng.random() < bad_share
        orders.append(Order(order_id=f"ord-{seed}-{i:05d}", customer_id=f"cust-{rng.randrange(900):03d}",
                            sku=f"sku-{rng.randrange(12):02d}", quantity=rng.choice([1, 1, 2]),
                            amount_cents=amount, refund_cents=amount * 2 if bad else amount))
    return orders


def seed_sandbox(sandbox_url: str, orders: list[Order]) -> None:
    """The shop's state before the delays: orders exist, half the SKUs are in stock."""
    http = httpx.Client(base_url=sandbox_url, timeout=10)
    for sku in sorted({o.sku for o in orders}):
        http.put(f"/_sandbox/inventory/{sku}", json={"available": 50 if int(sku[-2:]) % 2 == 0 else 0})
    for o in orders:
        resp = http.post("/v1/orders", headers={"Idempotency-Key": f"seed-{o.order_id}"}, json={
            "order_id": o.order_id, "customer_id": o.customer_id, "sku": o.sku, "quantity": o.quantity,
            "amount": o.amount_cents})
        assert resp.status_code in (200, 201, 409), resp.text


def publish_orders(producer: MeshProducer, orders: list[Order], tenant: str,
                   per_second: float = 0.0) -> dict[str, Order]:
    """The commerce platform reports each supplier delay as an order.delayed event
    (paced at ``per_second`` when given, so crashes land while work is in flight)."""
    sent = {}
    for i, o in enumerate(orders):
        if per_second and i:
            time.sleep(1 / per_second)
            if i % 10 == 0:
                producer.flush()
        event_id = new_event_id()
        sent[event_id] = o
        data = {"order_id": o.order_id, "customer_id": o.customer_id, "sku": o.sku, "quantity": o.quantity,
                "amount": round(o.refund_cents / 100, 2), "amount_cents": o.refund_cents}
        producer.send("ingress", o.order_id, {
            "event_id": event_id, "tenant": tenant, "occurred_at": now_ms(), "source": "commerce",
            "type": "order.delayed", "subject": o.order_id, "data_json": json.dumps(data), "workflow": None})
    producer.flush()
    return sent


class Approver:
    """The person at the approvals console: approves every step that waits for them, retrying
    while the planner restarts. ``gave_up`` lists the requests never answered (their runs would
    wait for ever), so a test can say why a run did not end."""

    def __init__(self, stub: workflow_pb2_grpc.WorkflowServiceStub, *, actor: str, reason: str,
                 deadline_s: float = 120) -> None:
        self.stub, self.actor, self.reason, self.deadline_s = stub, actor, reason, deadline_s
        self.approved = 0
        self.gave_up: list[str] = []

    def __call__(self, records: Any) -> None:
        for rec in records:
            v = rec.value
            if v["role"] == "operations":
                continue  # a failed compensation: a person acts by hand, outside this driver
            request = workflow_pb2.DecisionRequest(tenant=v["tenant"], run_id=v["run_id"], step_id=v["step_id"],
                                                   actor=self.actor, reason=self.reason)
            give_up = time.monotonic() + self.deadline_s
            while True:
                try:
                    self.stub.Approve(request, timeout=5)
                    self.approved += 1
                    break
                except grpc.RpcError as exc:
                    if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:  # type: ignore[attr-defined]
                        break  # already decided (a redelivered request)
                    if time.monotonic() > give_up:
                        self.gave_up.append(f"{v['run_id']}/{v['step_id']}: {exc.code().name}")  # type: ignore[attr-defined]
                        break
                    time.sleep(0.3)


# -- crashing whole process trees ---------------------------------------------------
def _stat(pid: int) -> list[str]:
    return cpu.stat(pid) or []


def _descendants(root: int) -> list[tuple[int, str]]:
    """(pid, start time) of every live descendant of ``root``; the start time tells a reused PID apart."""
    return [(pid, fields[19]) for pid in cpu.descendants(root) if len(fields := _stat(pid)) > 19]


def _gone(pid: int, started: str) -> bool:
    fields = _stat(pid)
    return len(fields) <= 19 or fields[19] != started or fields[0] == "Z"


def crash(stack: Stack, target: str) -> None:
    """kill -9 a part and every process it spawned, by PID, as losing its pod would. The stack
    kills the part's process group; Ray's workers (Serve replicas, the HTTP proxy) run in
    process groups of their own and would outlive it for seconds, still answering /healthz on
    the inference port, so they are killed one by one after it."""
    tree = _descendants(stack.procs[target].pid)
    stack.kill9(target)
    for pid, started in tree:
        if not _gone(pid, started):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(_gone(pid, started) for pid, started in tree):
        time.sleep(0.02)


def restart(stack: Stack, target: str) -> None:
    """Start a crashed part on its port and wait until it serves: Redis from its append-only file
    (dataset loaded), inference until /healthz answers, a service until its consumers joined."""
    if target == "redis":
        stack.start_redis()
    elif target == "inference":
        stack.start_inference(wait=True)
    else:
        stack.start_service(target)


@dataclass
class ChaosMonkey:
    """kill -9 a random target, wait, restart it; bounded in kills, kills per target and time.

    Targets are hit in shuffled rounds (each once per round, in a random order) so that every
    target is crashed within the first round. A target that exits on its own meanwhile (a
    service exits 70 when its consumer loop or producer dies) is restarted as the supervisor
    would and counted in ``exits``."""

    stack: Stack
    targets: tuple[str, ...] = TARGETS
    max_kills: int = 12
    max_seconds: float = 150
    interval_s: tuple[float, float] = (1.5, 4.0)
    down_s: tuple[float, float] = (0.2, 1.5)
    seed: int = 7
    max_per_target: dict[str, int] = field(default_factory=dict)
    kills: Counter[str] = field(default_factory=Counter)
    exits: Counter[str] = field(default_factory=Counter)
    restart_s: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    # (target, crashed at, serving again at), wall clock ms: the outages the runs lived through.
    outages: list[tuple[str, float, float]] = field(default_factory=list)
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-monkey", daemon=True)
        self._rng = random.Random(self.seed)
        self._round: list[str] = []

    def start(self) -> ChaosMonkey:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 300) -> None:
        """Stop after the restart in progress (inference takes tens of seconds)."""
        self._stop.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive() and self.error is None:
            self.error = TimeoutError(f"the chaos monkey did not stop within {timeout_s}s")

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def restart_summary(self) -> dict[str, str]:
        """Per target: restarts, mean and max seconds from start to serving."""
        return {t: f"{len(s)}x avg {sum(s) / len(s):.1f} max {max(s):.1f}" for t, s in sorted(self.restart_s.items())}

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # a failed restart must fail the test, not stall it
            self.error = exc

    def _next(self) -> str | None:
        allowed = [t for t in self.targets if self.kills[t] < self.max_per_target.get(t, self.max_kills)]
        self._round = [t for t in self._round if t in allowed]
        if not self._round:
            self._round = self._rng.sample(allowed, len(allowed))
        return self._round.pop() if self._round else None

    def _loop(self) -> None:
        started = time.monotonic()
        while sum(self.kills.values()) < self.max_kills and time.monotonic() - started < self.max_seconds:
            if self._stop.wait(self._rng.uniform(*self.interval_s)):
                return
            self._restart_exited()
            target = self._next()
            if target is None:
                return
            crashed_at = time.time() * 1000
            crash(self.stack, target)
            self.kills[target] += 1
            time.sleep(self._rng.uniform(*self.down_s))  # never skipped: a crashed target is always restarted
            self._timed_restart(target)
            self.outages.append((target, crashed_at, time.time() * 1000))

    def _restart_exited(self) -> None:
        for target in self.targets:
            proc = self.stack.procs.get(target)
            if proc is not None and not proc.alive():
                self.exits[target] += 1
                self.stack.procs.pop(target)
                self._timed_restart(target)

    def _timed_restart(self, target: str) -> None:
        t0 = time.monotonic()
        restart(self.stack, target)
        self.restart_s[target].append(time.monotonic() - t0)


# -- what the chaos tests check at the end ---------------------------------------------
def runs_by_event(stub: workflow_pb2_grpc.WorkflowServiceStub, tenant: str, event_ids: set[str],
                  workflow: str = "") -> dict[str, list[workflow_pb2.Run]]:
    """The runs of the tenant started by the given events (a redelivered event must not make a second)."""
    runs = stub.ListRuns(workflow_pb2.ListRunsRequest(tenant=tenant, workflow=workflow, limit=1000), timeout=10).runs
    found: dict[str, list[workflow_pb2.Run]] = defaultdict(list)
    for r in runs:
        event_id = json.loads(r.input_json).get("event", {}).get("id")
        if event_id in event_ids:
            found[event_id].append(r)
    return dict(found)


def final_runs(stub: workflow_pb2_grpc.WorkflowServiceStub, tenant: str, event_ids: set[str],
               workflow: str) -> list[workflow_pb2.Run]:
    return [r for runs in runs_by_event(stub, tenant, event_ids, workflow).values() for r in runs]


def wait_settled(poll: Callable[[], dict[str, list[workflow_pb2.Run]]], expected: int, *,
                 monkey: ChaosMonkey | None, timeout_s: float, stall_s: float = 45,
                 interval_s: float = 2.0) -> dict[str, list[workflow_pb2.Run]]:
    """Poll runs by event until ``expected`` events have only final runs and the monkey used up its
    kills or its time, or until then nothing changed for ``stall_s`` while every run found is final
    (an event may sit in the dead-letter topic: the caller replays it and waits again). Returns what
    it saw last; the caller asserts on it."""
    deadline = time.monotonic() + timeout_s
    seen: dict[str, list[workflow_pb2.Run]] = {}
    last, changed = None, time.monotonic()
    while time.monotonic() < deadline:
        if monkey is not None and monkey.error is not None:
            raise AssertionError(f"the chaos monkey failed to restart a target: {monkey.error!r}")
        try:
            seen = poll()
        except grpc.RpcError:
            pass  # the planner is restarting: keep what we saw
        runs = [r for rs in seen.values() for r in rs]
        state = sorted((r.run_id, r.status) for r in runs)
        if state != last:
            last, changed = state, time.monotonic()
        quiet = (monkey is None or not monkey.running) and all(r.status in FINAL for r in runs)
        if quiet and (len(seen) >= expected or time.monotonic() - changed >= stall_s):
            return seen
        time.sleep(interval_s)
    return seen


def failure_reasons(run: workflow_pb2.Run) -> str:
    """The run's error and its failed steps' errors, one line."""
    steps = [f"{s.step_id}#{s.attempt}: {s.error}" for s in run.steps if s.status == "failed" and s.error]
    return "; ".join([run.error, *steps]) if run.error or steps else "(no reason recorded)"


def infrastructure_failures(runs: list[workflow_pb2.Run]) -> dict[str, str]:
    """run id -> reasons, for failed runs whose reasons name a crash, a restart or a backlog."""
    failed = {r.run_id: failure_reasons(r) for r in runs if r.status != "completed"}
    return {run_id: why for run_id, why in failed.items() if any(w in why.lower() for w in INFRA_WORDS)}


def effect_report(sandbox_url: str) -> dict[str, Any]:
    effects = SandboxClient(sandbox_url).effects()
    by_key = effects["by_key"]
    return {"counts": effects["counts"], "by_key": by_key,
            "duplicates": {kind: {k: c for k, c in keys.items() if c != 1} for kind, keys in by_key.items()},
            "refund_keys": len(by_key.get("refund.create", {})),
            "notification_keys": len(by_key.get("notification.send", {}))}


# -- dead letters -----------------------------------------------------------------------
def _settings(stack: Stack) -> Any:
    from services.common.settings import MeshSettings

    env = stack.env()
    return MeshSettings(kafka_bootstrap=env["AIOS_KAFKA_BOOTSTRAP"], redis_url=env["AIOS_REDIS_URL"],
                        topic_prefix=stack.topic_prefix)


def dead_letters(stack: Stack) -> list[Any]:
    """Every record of the stack's dead-letter topic (``tools.aios.dlq.DeadLetter``)."""
    from tools.aios import dlq

    return dlq.read_all(_settings(stack))


def describe_dead_letters(entries: list[Any]) -> str:
    """One line per dead letter: where it came from, why, whether a replay can finish it."""
    return "\n".join(f"  {e.partition}/{e.offset} {e.get('service')} {e.source_topic} key={e.run_hint()} "
                     f"{e.error_type} retryable={e.get('retryable')} attempts={e.get('attempts')}: "
                     f"{e.message[:300]}" for e in entries) or "  (none)"


def replay_dead_letters(stack: Stack, entries: list[Any]) -> list[Any]:
    """Re-publish them to their source topics with the dlq tool (``aios dlq replay``); its outcomes."""
    from tools.aios import dlq
    from tools.aios.clients import redis_client

    settings = _settings(stack)
    client = redis_client(settings.redis_url)
    try:
        return dlq.replay(settings, entries, client)
    finally:
        client.close()


def runs_through_outages(monkey: ChaosMonkey, runs: list[workflow_pb2.Run]) -> list[int]:
    """Per crash, how many runs were under way at some moment between the crash and the target
    serving again (created before it served, not finished before it crashed)."""
    return [sum(1 for r in runs if r.created_at_ms <= back and not 0 < r.finished_at_ms < crashed)
            for _target, crashed, back in monkey.outages]


def summary_line(workload: str, *, runs: list[workflow_pb2.Run], elapsed_s: float, monkey: ChaosMonkey,
                 outcomes: dict[str, int], effects: dict[str, int], dead: list[Any], replayed: int = 0,
                 extra: str = "") -> str:
    """The one line a chaos test prints for its workload."""
    dead_types = dict(Counter(e.error_type for e in dead))
    flying = sorted(runs_through_outages(monkey, runs)) or [0]
    retried: dict[str, int] = {}  # step -> highest attempt it needed
    for s in (s for r in runs for s in r.steps if s.attempt > 1):
        retried[s.step_id] = max(s.attempt, retried.get(s.step_id, 0))
    n_retried = sum(1 for r in runs for s in r.steps if s.attempt > 1)
    return (f"chaos {workload}: {len(runs)} runs in {elapsed_s:.0f}s; kills {dict(sorted(monkey.kills.items()))} "
            f"(self-exits {dict(monkey.exits)}); runs under way per outage min {flying[0]} "
            f"median {flying[len(flying) // 2]} max {flying[-1]}; restarts {monkey.restart_summary()}; "
            f"outcomes {outcomes}; steps retried {n_retried} (highest attempt per step {retried}); "
            f"{extra}effects {dict(sorted(effects.items()))}; dead letters {len(dead)} {dead_types}, "
            f"replayed {replayed}")
