"""Order-recovery traffic and a bounded chaos monkey, shared by the chaos test
and the recovery benchmark. The monkey kill -9s mesh services at random moments
and restarts them; the sandbox commerce API counts every effect per key."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx

from aiosmesh.v1 import workflow_pb2, workflow_pb2_grpc
from infra.stack import Stack
from services.common.kafka import MeshProducer, new_event_id, now_ms
from tools.sandbox.client import SandboxClient

FINAL = {"completed", "failed", "cancelled", "compensation_failed"}


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
    import json

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


class FinanceApprover:
    """The finance person: approves every refund that waits for them, retrying while the planner restarts."""

    def __init__(self, stub: workflow_pb2_grpc.WorkflowServiceStub, deadline_s: float = 90) -> None:
        self.stub, self.deadline_s = stub, deadline_s
        self.approved = 0

    def __call__(self, records: Any) -> None:
        for rec in records:
            v = rec.value
            if v["role"] == "operations":
                continue  # a failed compensation: a person acts by hand, outside this driver
            request = workflow_pb2.DecisionRequest(tenant=v["tenant"], run_id=v["run_id"], step_id=v["step_id"],
                                                   actor="finance@chaos", reason="delay refund checked")
            give_up = time.monotonic() + self.deadline_s
            while True:
                try:
                    self.stub.Approve(request, timeout=5)
                    self.approved += 1
                    break
                except grpc.RpcError as exc:
                    if exc.code() == grpc.StatusCode.FAILED_PRECONDITION or time.monotonic() > give_up:  # type: ignore[attr-defined]
                        break  # already decided (a redelivered request), or give up
                    time.sleep(0.3)


@dataclass
class ChaosMonkey:
    """Kill -9 a random target, wait, restart it; bounded in kills and time."""

    stack: Stack
    targets: tuple[str, ...] = ("planner", "executor", "policy", "memory")
    max_kills: int = 12
    max_seconds: float = 150
    interval_s: tuple[float, float] = (1.5, 4.0)
    down_s: tuple[float, float] = (0.2, 1.5)
    seed: int = 7
    kills: Counter[str] = field(default_factory=Counter)
    restart_s: list[float] = field(default_factory=list)
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-monkey", daemon=True)
        self._rng = random.Random(self.seed)
        self._round: list[str] = []

    def start(self) -> ChaosMonkey:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(120)

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # a failed restart must fail the test, not stall it
            self.error = exc

    def _loop(self) -> None:
        started = time.monotonic()
        while sum(self.kills.values()) < self.max_kills and time.monotonic() - started < self.max_seconds:
            if self._stop.wait(self._rng.uniform(*self.interval_s)):
                return
            # Shuffled rounds: every target is killed once per round, in a random order.
            if not self._round:
                self._round = self._rng.sample(list(self.targets), len(self.targets))
            target = self._round.pop()
            self.stack.kill9(target)
            self.kills[target] += 1
            time.sleep(self._rng.uniform(*self.down_s))
            t0 = time.monotonic()
            self.stack.start_service(target)
            self.restart_s.append(time.monotonic() - t0)


def final_runs(stub: workflow_pb2_grpc.WorkflowServiceStub, tenant: str, event_ids: set[str],
               workflow: str) -> list[workflow_pb2.Run]:
    import json

    runs = stub.ListRuns(workflow_pb2.ListRunsRequest(tenant=tenant, workflow=workflow, limit=1000), timeout=10).runs
    return [r for r in runs if json.loads(r.input_json).get("event", {}).get("id") in event_ids]


def effect_report(sandbox_url: str) -> dict[str, Any]:
    effects = SandboxClient(sandbox_url).effects()
    by_key = effects["by_key"]
    return {"counts": effects["counts"],
            "duplicates": {kind: {k: c for k, c in keys.items() if c != 1} for kind, keys in by_key.items()},
            "refund_keys": len(by_key.get("refund.create", {})),
            "notification_keys": len(by_key.get("notification.send", {}))}
