"""Orchestration benchmarks on the embedded stack: the raw Kafka request/reply
floor, overhead per step, short-workflow throughput and recovery after kill -9.
Every loop is bounded in count and time."""

from __future__ import annotations

import json
import statistics
import threading
import time
import uuid
from typing import Any

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from aiosmesh.v1 import workflow_pb2, workflow_pb2_grpc
from infra.stack import Stack
from services.common.catalog import Catalog
from services.common.codec import AvroCodec
from services.common.grpc_server import channel
from services.common.kafka import MeshProducer, new_event_id, now_ms
from tools import chaos


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else 0.0


def raw_round_trip(bootstrap: str, fetch_wait_ms: int, n: int = 300, timeout_s: float = 60) -> dict[str, float]:
    """One Kafka request/reply round trip with the mesh's consumer settings: the physical floor."""
    req, rep = f"bench.rr.req.{uuid.uuid4().hex[:6]}", f"bench.rr.rep.{uuid.uuid4().hex[:6]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for fut in admin.create_topics([NewTopic(req, 1, 1), NewTopic(rep, 1, 1)]).values():
        fut.result(30)
    conf = {"bootstrap.servers": bootstrap, "fetch.wait.max.ms": fetch_wait_ms, "session.timeout.ms": 6000,
            "auto.offset.reset": "latest", "enable.auto.commit": False}
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0, "acks": "all"})
    stop = threading.Event()

    def responder() -> None:
        c = Consumer({**conf, "group.id": f"rr-s-{uuid.uuid4().hex[:6]}"})
        c.subscribe([req])
        p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0, "acks": "all"})
        while not stop.is_set():
            m = c.poll(0.05)
            if m is not None and not m.error():
                p.produce(rep, m.value())
                p.poll(0)
        c.close()

    thread = threading.Thread(target=responder, daemon=True)
    thread.start()
    client = Consumer({**conf, "group.id": f"rr-c-{uuid.uuid4().hex[:6]}"})
    client.subscribe([rep])
    samples: list[float] = []
    deadline = time.monotonic() + timeout_s
    # Warm-up until the groups have joined and a reply comes back.
    while time.monotonic() < deadline and not samples:
        producer.produce(req, b"warm")
        producer.flush()
        m = client.poll(1.0)
        if m is not None and not m.error():
            samples.append(0.0)
    samples.clear()
    while len(samples) < n and time.monotonic() < deadline:
        t0 = time.perf_counter()
        token = uuid.uuid4().bytes
        producer.produce(req, token)
        producer.flush()
        while time.monotonic() < deadline:
            m = client.poll(0.5)
            if m is not None and not m.error() and m.value() == token:
                samples.append((time.perf_counter() - t0) * 1000)
                break
    stop.set()
    thread.join(5)
    client.close()
    return {"n": len(samples), "p50_ms": pct(samples, 0.5), "p99_ms": pct(samples, 0.99),
            "mean_ms": statistics.fmean(samples) if samples else 0.0}


def _stub(stack: Stack) -> workflow_pb2_grpc.WorkflowServiceStub:
    return workflow_pb2_grpc.WorkflowServiceStub(channel(stack.env()["AIOS_PLANNER_ADDR"]))


def _wait_run(stub: workflow_pb2_grpc.WorkflowServiceStub, tenant: str, run_id: str,
              timeout_s: float = 30, poll_s: float = 0.005) -> workflow_pb2.Run:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            run = stub.GetRun(workflow_pb2.GetRunRequest(tenant=tenant, run_id=run_id), timeout=5)
            if run.status in chaos.FINAL:
                return run
        except Exception:
            pass
        time.sleep(poll_s)
    raise TimeoutError(f"run {run_id} not final after {timeout_s}s")


def step_overhead(stack: Stack, runs: int = 30, tenant: str = "bench") -> dict[str, float]:
    """Sequential runs of a 10 no-op step chain; per-step overhead = dispatch-to-dispatch interval."""
    stub = _stub(stack)
    intervals: list[float] = []
    for i in range(runs + 2):
        run_id = stub.StartWorkflow(workflow_pb2.StartWorkflowRequest(
            tenant=tenant, workflow="bench-noop-chain", input_json="{}"), timeout=10).run_id
        run = _wait_run(stub, tenant, run_id)
        starts = [s.started_at_ms for s in run.steps]
        if i >= 2:  # first runs warm caches and connections
            intervals += [b - a for a, b in zip(starts, starts[1:], strict=False)]
    return {"runs": runs, "steps": len(intervals), "p50_ms": pct(intervals, 0.5), "p99_ms": pct(intervals, 0.99),
            "mean_ms": statistics.fmean(intervals)}


def throughput(stack: Stack, n_runs: int = 600, tenant: str = "bench", timeout_s: float = 180,
               latencies: bool = False) -> dict[str, float]:
    """n_runs three-step workflows published at once (all concurrent); time until all are final.
    ``latencies``: also p50/p99 of each run's finish time (the planner's finished_at_ms) after the
    burst's start, and the time until the last run finished (no polling granularity)."""
    env = stack.env()
    t0_wall_ms = time.time() * 1000
    catalog = Catalog(stack.topic_prefix)
    producer = MeshProducer(env["AIOS_KAFKA_BOOTSTRAP"], catalog, AvroCodec(catalog.schemas), linger_ms=5)
    stub = _stub(stack)
    batch = uuid.uuid4().hex[:6]
    t0 = time.monotonic()
    for i in range(n_runs):
        producer.send("ingress", f"b{i}", {"event_id": new_event_id(), "tenant": tenant, "occurred_at": now_ms(),
                                           "source": "bench", "type": "bench.tick", "subject": f"{batch}-{i}",
                                           "data_json": json.dumps({"n": i, "batch": batch}), "workflow": None})
    producer.flush()
    done = 0
    finished: list[float] = []
    while time.monotonic() - t0 < timeout_s:
        runs = stub.ListRuns(workflow_pb2.ListRunsRequest(tenant=tenant, workflow="bench-three-step",
                                                          limit=1000), timeout=10).runs
        finished = [r.finished_at_ms - t0_wall_ms for r in runs if r.status == "completed" and batch in r.input_json]
        done = len(finished)
        if done >= n_runs:
            break
        time.sleep(1.0)  # ListRuns is served by the planner: polling it often would slow what it measures
    # The elapsed time is the planner's own clock of the last finish, not the polling's granularity.
    elapsed = max(finished) / 1000 if done >= n_runs and finished else time.monotonic() - t0
    out = {"runs": done, "concurrency": n_runs, "seconds": elapsed, "runs_per_s": done / elapsed,
           "steps_per_s": 3 * done / elapsed}
    if latencies and finished:
        out.update({"p50_ms": pct(finished, 0.5), "p99_ms": pct(finished, 0.99),
                    "last_finished_s": max(finished) / 1000})
    return out


def recovery(stack: Stack, n_orders: int = 200, kill_after_s: float = 6.0, tenant: str = "shop") -> dict[str, Any]:
    """Order-recovery load at 10 runs/s; kill -9 the planner mid-load, restart it at once; measure the
    time until a run completes again, and count lost runs and duplicated effects."""
    env = stack.env()
    catalog = Catalog(stack.topic_prefix)
    producer = MeshProducer(env["AIOS_KAFKA_BOOTSTRAP"], catalog, AvroCodec(catalog.schemas))
    stub = _stub(stack)
    candidates = chaos.make_orders(n_orders * 4, seed=int(time.time()) % 1000, bad_share=0.0)
    # Below the approval threshold: no human in the loop, so the timing is the mesh's own.
    orders = [o for o in candidates if o.refund_cents <= 10000][:n_orders]
    chaos.seed_sandbox(env["AIOS_SANDBOX_URL"], orders)
    sent: dict[str, chaos.Order] = {}
    publisher = threading.Thread(target=lambda: sent.update(chaos.publish_orders(producer, orders, tenant, 10)))
    publisher.start()
    time.sleep(kill_after_s)

    def completed() -> int:
        runs = stub.ListRuns(workflow_pb2.ListRunsRequest(tenant=tenant, workflow="order-recovery", limit=1000),
                             timeout=10).runs
        return sum(r.status == "completed" for r in runs)

    before = completed()
    killed_at = time.monotonic()
    stack.kill9("planner")
    stack.start_service("planner", wait=False)
    moved_after = None
    while time.monotonic() - killed_at < 120:
        try:
            if completed() > before:
                moved_after = time.monotonic() - killed_at
                break
        except Exception:
            pass
        time.sleep(0.05)
    publisher.join(120)
    deadline = time.monotonic() + 180
    final: list[workflow_pb2.Run] = []
    while time.monotonic() < deadline:
        try:
            final = chaos.final_runs(stub, tenant, set(sent), "order-recovery")
        except Exception:
            final = []
        if len(final) == len(orders) and all(r.status in chaos.FINAL for r in final):
            break
        time.sleep(0.5)
    report = chaos.effect_report(env["AIOS_SANDBOX_URL"])
    return {"runs": len(orders), "rate_per_s": 10, "killed": "planner",
            "seconds_until_runs_move": moved_after,
            "lost_runs": len(orders) - sum(r.status in chaos.FINAL for r in final),
            "duplicated_effects": sum(len(v) for v in report["duplicates"].values()),
            "refunds": report["refund_keys"], "notifications": report["notification_keys"]}
