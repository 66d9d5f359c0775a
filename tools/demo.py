"""`make demo`: the main job on the embedded stack, end to end.

Starts the broker, Redis, Ray Serve inference, the sandbox third-party API and
the five services; publishes held-out BANKING77 support messages as upstream
events; plays the fraud-ops person who approves (or rejects) card blocks;
waits until every run ends; prints what happened; stops everything it started."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections import Counter
from typing import Any

import grpc
import httpx

from aiosmesh.v1 import workflow_pb2, workflow_pb2_grpc
from infra.stack import Stack
from services.common.catalog import Catalog
from services.common.codec import AvroCodec
from services.common.grpc_server import channel
from services.common.kafka import ConsumerLoop, MeshProducer
from services.planner.workflows import Registry
from tools import triage

FINAL = {"completed", "failed", "cancelled", "compensation_failed"}


class Approver:
    """The person at the fraud-ops console: approves card blocks, rejects one in ten
    (say, the caller could not be verified), via the planner's gRPC API."""

    def __init__(self, stub: workflow_pb2_grpc.WorkflowServiceStub, tenant: str) -> None:
        self.stub, self.tenant = stub, tenant
        self.decisions: Counter[str] = Counter()

    def __call__(self, records: Any) -> None:
        for rec in records:
            v = rec.value
            if v["role"] == "operations":
                self.decisions["manual"] += 1
                continue
            reject = int(v["run_id"][-2:], 16) % 10 == 0
            request = workflow_pb2.DecisionRequest(tenant=v["tenant"], run_id=v["run_id"], step_id=v["step_id"],
                                                   actor="demo-operator@fraud-ops",
                                                   reason="caller not verified" if reject else "verified by phone")
            try:
                (self.stub.Reject if reject else self.stub.Approve)(request, timeout=5)
                self.decisions["rejected" if reject else "approved"] += 1
            except grpc.RpcError as exc:
                self.decisions[f"error:{exc.code().name}"] += 1  # type: ignore[attr-defined]


def wait_runs(stub: workflow_pb2_grpc.WorkflowServiceStub, tenant: str, event_ids: set[str], timeout_s: float,
              since_ms: float = 0.0) -> list[workflow_pb2.Run]:
    """The runs of the events this demo published (``event_ids``), once all are final or at the deadline.
    Only those count: Redis keeps the runs of earlier demos (the embedded stack persists it), and a
    second ``make demo`` must not report the first one's runs as its own."""
    deadline = time.monotonic() + timeout_s
    runs: list[workflow_pb2.Run] = []
    last = -1
    while time.monotonic() < deadline:
        runs = [r for r in _runs_since(stub, tenant, since_ms) if _event_of(r) in event_ids]
        done = sum(r.status in FINAL for r in runs)
        if done != last:
            print(f"  runs finished: {done}/{len(event_ids)}", flush=True)
            last = done
        if len(runs) >= len(event_ids) and done >= len(event_ids):
            break
        time.sleep(1.0)
    return runs


def _runs_since(stub: workflow_pb2_grpc.WorkflowServiceStub, tenant: str, since_ms: float) -> list[workflow_pb2.Run]:
    runs: list[workflow_pb2.Run] = []
    token = ""
    while True:
        page = stub.ListRuns(workflow_pb2.ListRunsRequest(tenant=tenant, limit=1000, page_token=token,
                                                          created_after_ms=since_ms), timeout=10)
        runs += page.runs
        token = page.next_page_token
        if not token:
            return runs


def _event_of(run: workflow_pb2.Run) -> str:
    """The id of the upstream event that started ``run`` ("" for a run started otherwise)."""
    try:
        run_input = json.loads(run.input_json or "{}")
    except ValueError:
        return ""
    event = run_input.get("event") if isinstance(run_input, dict) else None
    return str(event.get("id") or "") if isinstance(event, dict) else ""


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summarize(runs: list[workflow_pb2.Run], sent: dict[str, triage.Message], registry: Registry,
              elapsed_s: float, approver: Approver, effects: dict[str, Any], stack: Stack) -> dict[str, Any]:
    by_wf: dict[str, Counter[str]] = {}
    latencies: list[float] = []
    correct_intent = correct_wf = 0
    intent_routes = {i: wf.name for wf in registry.all_latest() for i in wf.trigger.get("intents", [])}
    sample_reply = None
    for run in runs:
        by_wf.setdefault(run.workflow, Counter())[run.status] += 1
        if run.finished_at_ms:
            latencies.append(run.finished_at_ms - run.created_at_ms)
        run_input = json.loads(run.input_json)
        msg = sent.get(run_input.get("event", {}).get("id", ""))
        if msg is None:
            continue
        correct_intent += run_input.get("intent") == msg.label
        correct_wf += run.workflow == intent_routes.get(msg.label, "support-reply")
        if sample_reply is None and run.workflow == "support-reply" and run.status == "completed":
            sample_reply = (msg.text, json.loads(run.output_json))
    n = max(1, len(runs))
    return {"runs": len(runs), "by_workflow": {k: dict(v) for k, v in by_wf.items()},
            "latency_ms": {"p50": pct(latencies, 0.5), "p95": pct(latencies, 0.95)},
            "intent_accuracy": correct_intent / n, "workflow_accuracy": correct_wf / n,
            "throughput_msgs_per_s": len(runs) / elapsed_s if elapsed_s else 0.0,
            "approvals": dict(approver.decisions), "effects": effects.get("counts", {}),
            "sample_reply": sample_reply}


def print_summary(s: dict[str, Any], stack: Stack) -> None:
    p = stack.ports
    print("\n=== AIOS mesh demo: support triage on BANKING77 (held-out messages) ===")
    print(f"runs: {s['runs']}   throughput: {s['throughput_msgs_per_s']:.1f} messages/s end to end")
    for wf, outcomes in sorted(s["by_workflow"].items()):
        print(f"  {wf:22} " + "  ".join(f"{k}={v}" for k, v in sorted(outcomes.items())))
    print(f"end-to-end latency per run: p50 {s['latency_ms']['p50']:.0f} ms, p95 {s['latency_ms']['p95']:.0f} ms "
          "(run created -> final state; card blocks include the human approval)")
    print(f"routing accuracy vs BANKING77 labels: intent {s['intent_accuracy']:.1%}, "
          f"workflow {s['workflow_accuracy']:.1%}")
    print(f"human gate: {s['approvals']}")
    print(f"side effects at the sandbox bank API (one per idempotency key): {s['effects']}")
    if s["sample_reply"]:
        text, out = s["sample_reply"]
        print(f"\nsample reply to: {text!r}\n---\n{out.get('reply', '')}\n---\nhow: {out.get('how')}")
    print("\nwhere to look next:")
    print("  metrics: " + ", ".join(f"{k} http://127.0.0.1:{v}/metrics" for k, v in p.metrics.items()))
    print("  CLI (while `make up` runs): aios status | aios workflows list | aios workflows show RUN | "
          "aios approvals | aios dlq list")
    print(f"  logs: {stack.log_dir}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.demo")
    parser.add_argument("--messages", type=int, default=240)
    parser.add_argument("--tenant", default="demo")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--keep", action="store_true", help="leave the stack running (stop with make down)")
    args = parser.parse_args(argv)
    stack = Stack(tenant=args.tenant)
    if Stack.attach().procs:
        print("a stack is already running (.run/stack.json); run `make down` first", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        return run_demo(stack, args)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping everything")
        return 130
    finally:
        if not args.keep:
            stack.down()
            print("stack stopped: no process left behind")


def run_demo(stack: Stack, args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    print("starting the embedded stack: broker, Redis, Ray Serve inference, sandbox API, five services ...")
    stack.up()
    print(f"  up in {time.monotonic() - t0:.1f}s: " + ", ".join(f"{n}(pid {p.pid})" for n, p in stack.procs.items()))
    env = stack.env()
    os.environ.update({k: v for k, v in env.items() if k.startswith("AIOS_")})
    catalog = Catalog(stack.topic_prefix)
    codec = AvroCodec(catalog.schemas)
    producer = MeshProducer(env["AIOS_KAFKA_BOOTSTRAP"], catalog, codec)
    stub = workflow_pb2_grpc.WorkflowServiceStub(channel(env["AIOS_PLANNER_ADDR"]))
    approver = Approver(stub, args.tenant)
    approvals = ConsumerLoop(service="demo-approver", group=stack.topic_prefix + "demo-approver",
                             roles=["approvals"], handler=approver, bootstrap=env["AIOS_KAFKA_BOOTSTRAP"],
                             catalog=catalog, codec=codec, producer=producer).start()
    messages = triage.load_holdout(args.messages)
    print(f"publishing {len(messages)} held-out support messages as upstream events ...")
    t1, published_ms = time.monotonic(), time.time() * 1000
    sent = triage.publish(producer, messages, args.tenant)
    runs = wait_runs(stub, args.tenant, set(sent), args.timeout, since_ms=published_ms - 1000)
    elapsed = time.monotonic() - t1
    approvals.stop()
    effects = httpx.get(env["AIOS_SANDBOX_URL"] + "/_sandbox/effects", timeout=5).json()
    summary = summarize(runs, sent, Registry.from_dir(), elapsed, approver, effects, stack)
    print_summary(summary, stack)
    (stack.run_dir / "demo-summary.json").write_text(json.dumps(summary, indent=2, default=str))
    finished = sum(r.status in FINAL for r in runs)
    if finished < len(messages):
        print(f"\nWARNING: {len(messages) - finished} runs did not finish within {args.timeout}s", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
