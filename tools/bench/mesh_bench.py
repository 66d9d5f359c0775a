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

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from aiosmesh.v1 import workflow_pb2, workflow_pb2_grpc
from infra.stack import Ports, Stack
from services.common.catalog import Catalog
from services.common.codec import AvroCodec
from services.common.grpc_server import channel
from services.common.kafka import MeshProducer, new_event_id, now_ms
from services.common.runtime import StandbyLease
from services.planner.domain.state import RunState
from services.planner.handlers import run_id_for
from services.planner.store import RunQueries
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


def planner_member(stack: Stack) -> str:
    """Which planner process of ``stack`` is the planner group's member now: the holder of the group's
    standby lease (``planner`` when the stack has no hot standby)."""
    import redis

    if not stack.planner_standbys:
        return "planner"
    client = redis.Redis.from_url(stack.env()["AIOS_REDIS_URL"], decode_responses=True, socket_timeout=5)
    try:
        holder = str(client.get(StandbyLease.key_for(stack.topic_prefix + "planner")) or "")
    finally:
        client.close()
    pid = StandbyLease.pid_of(holder)
    running = {name: proc.pid for name, proc in stack.procs.items()}
    running.update({name: state.pid for name, state in stack.supervised().items()})
    return next((name for name, p in running.items() if p == pid and name.startswith("planner")), "planner")


def run_states(stack: Stack, tenant: str, event_ids: list[str]) -> dict[str, RunState | None]:
    """The run each ingress event made, read from Redis (the planner's run ids are a function of the event)."""
    import redis

    client = redis.Redis.from_url(stack.env()["AIOS_REDIS_URL"], decode_responses=True, socket_timeout=10)
    try:
        queries = RunQueries(client)
        return {e: queries.get(tenant, run_id_for(tenant, e)) for e in event_ids}
    finally:
        client.close()


def key_partitions(stack: Stack, role: str, timeout_s: float = 30) -> dict[str, int]:
    """Key -> partition of every record of a topic, read from the start (no group): which partition,
    hence which group member, a run's records went to."""
    topic = Catalog(stack.topic_prefix).topic(role)
    consumer = Consumer({"bootstrap.servers": stack.env()["AIOS_KAFKA_BOOTSTRAP"], "group.id": f"scan-{uuid.uuid4().hex[:6]}",
                         "enable.auto.commit": False, "fetch.wait.max.ms": 10})
    out: dict[str, int] = {}
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ends = {p: (consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10) or (0, 0))[1] for p in parts}
        todo = {p for p, end in ends.items() if end > 0}
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in todo])
        deadline = time.monotonic() + timeout_s
        while todo and time.monotonic() < deadline:
            for msg in consumer.consume(500, timeout=0.5):
                if msg.error():
                    continue
                out[(msg.key() or b"").decode()] = msg.partition()
                if (msg.offset() or 0) + 1 >= ends[msg.partition()]:
                    todo.discard(msg.partition())
    finally:
        consumer.close()
    return out


def moved_after(states: list[RunState], killed_ms: float, partition_of: dict[str, int]) -> float | None:
    """Seconds from the kill until the runs of every partition of the step results moved again: per
    partition the first step result or run end the planner recorded after the kill (its own clock),
    the slowest partition counts. Partitions with nothing to do after the kill do not count."""
    first: dict[int, float] = {}
    for run in states:
        part = partition_of.get(run.run_id)
        if part is None:
            continue
        stamps = [s.finished_at for s in run.steps.values()] + [run.finished_at]
        after = [t for t in stamps if t and t > killed_ms]
        if after:
            first[part] = min(first.get(part, min(after)), min(after))
    return (max(first.values()) - killed_ms) / 1000 if first else None


def recovery(stack: Stack, n_orders: int = 200, kill_after_s: float = 6.0, tenant: str = "shop") -> dict[str, Any]:
    """Order-recovery load at 10 runs/s on a planner with a hot standby (docs/DECISIONS.md, "hot
    standby"): kill -9 the planner that is the group's member mid-load and restart it at once (it
    comes back as the standby). Measured through Redis, never through the killed process:
    ``moved_after_s`` until the runs of every partition move again, ``seconds_until_runs_move``
    until the first run completes again (both from the times the planner wrote into run state),
    lost runs (an event without a final run) and duplicated effects (the sandbox counts each effect
    per key). A stack without a standby gets one of its own for this: a planner group keeps the
    session timeout of the member that created it, so a standby cannot be added to a running stack."""
    if not stack.planner_standbys:
        own = Stack(Ports.fresh(), run_dir=stack.run_dir.with_name(stack.run_dir.name + "-recovery"),
                    topic_prefix=f"{stack.topic_prefix}rec.", tenant=stack.tenant, auth=stack.auth, planner_standbys=1)
        try:
            own.up(inference=False)
            return recovery(own, n_orders, kill_after_s, tenant)
        finally:
            own.down()
    env = stack.env()
    catalog = Catalog(stack.topic_prefix)
    producer = MeshProducer(env["AIOS_KAFKA_BOOTSTRAP"], catalog, AvroCodec(catalog.schemas))
    candidates = chaos.make_orders(n_orders * 4, seed=int(time.time()) % 1000, bad_share=0.0)
    # Below the approval threshold: no human in the loop, so the timing is the mesh's own.
    orders = [o for o in candidates if o.refund_cents <= 10000][:n_orders]
    chaos.seed_sandbox(env["AIOS_SANDBOX_URL"], orders)
    sent: dict[str, chaos.Order] = {}
    publisher = threading.Thread(target=lambda: sent.update(chaos.publish_orders(producer, orders, tenant, 10)))
    publisher.start()
    time.sleep(kill_after_s)
    member = planner_member(stack)
    killed_ms = time.time() * 1000
    stack.kill9(member)
    stack.start_service(member, wait=False)  # restarted at once; it comes back as the standby
    publisher.join(120)
    deadline = time.monotonic() + 180
    states: dict[str, RunState | None] = {}
    while time.monotonic() < deadline:
        states = run_states(stack, tenant, list(sent))
        if all(r is not None and r.status in chaos.FINAL for r in states.values()):
            break
        time.sleep(0.5)
    runs = [r for r in states.values() if r is not None]
    completions = sorted(r.finished_at for r in runs if r.status == "completed" and r.finished_at > killed_ms)
    report = chaos.effect_report(env["AIOS_SANDBOX_URL"])
    return {"runs": len(orders), "rate_per_s": 10, "killed": member, "standbys": stack.planner_standbys,
            "moved_after_s": moved_after(runs, killed_ms, key_partitions(stack, "step_results")),
            "seconds_until_runs_move": (completions[0] - killed_ms) / 1000 if completions else None,
            "lost_runs": len(orders) - sum(r.status in chaos.FINAL for r in runs),
            "duplicated_effects": sum(len(v) for v in report["duplicates"].values()),
            "refunds": report["refund_keys"], "notifications": report["notification_keys"]}
