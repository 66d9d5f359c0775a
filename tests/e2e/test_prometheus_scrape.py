"""A real Prometheus (Debian's package, tests/monitoring/conftest.py) scrapes every service
and Ray's metrics endpoint while support-triage runs go through the whole mesh; afterwards
every PromQL expression of every dashboard panel and alert rule parses on it, names only
series the mesh exports, and every panel's query returns data."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from aiosmesh.v1 import workflow_pb2, workflow_pb2_grpc
from infra.stack import Stack
from services.common.catalog import Catalog
from services.common.codec import AvroCodec
from services.common.grpc_server import channel
from services.common.kafka import ConsumerLoop, MeshProducer
from tests.conftest import wait_for
from tests.monitoring import live, promql
from tests.monitoring.conftest import prometheus_binary
from tools import triage
from tools.demo import FINAL, Approver

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
N_MESSAGES = 30


def _run_traffic(mesh: Stack) -> None:
    """Held-out messages through the mesh, with an approver for card blocks, until every run finished."""
    env = mesh.env()
    catalog = Catalog(mesh.topic_prefix)
    producer = MeshProducer(env["AIOS_KAFKA_BOOTSTRAP"], catalog, AvroCodec(catalog.schemas))
    stub = workflow_pb2_grpc.WorkflowServiceStub(channel(env["AIOS_PLANNER_ADDR"]))
    approvals = ConsumerLoop(service="test", group=f"{mesh.topic_prefix}prom-approver", roles=["approvals"],
                             handler=Approver(stub, "demo"), bootstrap=env["AIOS_KAFKA_BOOTSTRAP"], catalog=catalog,
                             codec=AvroCodec(catalog.schemas), producer=producer).start()
    try:
        sent = triage.publish(producer, triage.load_holdout(N_MESSAGES, seed=11), "demo")

        def finished() -> bool:
            runs = stub.ListRuns(workflow_pb2.ListRunsRequest(tenant="demo", limit=1000), timeout=10).runs
            mine = [r for r in runs if json.loads(r.input_json).get("event", {}).get("id") in sent]
            return len(mine) == N_MESSAGES and all(r.status in FINAL for r in mine)

        wait_for(finished, timeout_s=300, interval_s=1, message=f"{N_MESSAGES} runs to finish")
    finally:
        approvals.stop()


def test_prometheus_scrapes_the_mesh_and_every_panel_has_data(mesh: Stack, tmp_path: Path) -> None:
    with live.running(prometheus_binary("prometheus"), mesh, tmp_path) as prom:
        _run_traffic(mesh)
        # Everything the run did is observed (observability consumes in the background) and scraped.
        wait_for(lambda: prom.series(f"sum(aios_workflow_runs_finished_total) >= {N_MESSAGES}"), timeout_s=60,
                 interval_s=1, message="the finished runs in Prometheus")
        time.sleep(3)  # a few more scrapes, so every rate window holds two samples of the last values
        # Ray's metrics agent exports Serve's series every few seconds, later than the mesh's own
        # (a loaded box, 2,000+ tests before this one): give every panel up to a minute to have data.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(
                prom.query(expr).get("data", {}).get("result") for _d, _t, expr in promql.panel_queries()):
            time.sleep(2)

        targets = prom.get("/api/v1/targets")["activeTargets"]
        health = {t["labels"]["job"]: t["health"] for t in targets}
        assert health == {job: "up" for job in [*mesh.ports.metrics, "inference"]}, \
            {t["labels"]["job"]: t.get("lastError") for t in targets if t["health"] != "up"}

        seen = set(prom.get("/api/v1/label/__name__/values")) | \
            {f"{name}{suffix}" for name in prom.get("/api/v1/metadata")
             for suffix in ("", "_total", "_bucket", "_sum", "_count")} | \
            {r["record"] for r in promql.rules() if "record" in r}
        problems, fallbacks = [], []
        for dashboard, title, expr in promql.panel_queries():
            where = f"{dashboard}/{title}: {expr}"
            answer = prom.query(expr)
            if answer["status"] != "success":
                problems.append(f"does not evaluate: {where}: {answer.get('error')}")
                continue
            if not answer["data"]["result"]:
                problems.append(f"no data: {where}")
            if expr.endswith(" or vector(0)") and not prom.series(expr.removesuffix(" or vector(0)")):
                fallbacks.append(f"{dashboard}/{title}")
            problems += [f"names {name}, which no target exports: {where}"
                         for name in promql.metric_names(expr) - seen]
        for rule in promql.rules():
            answer = prom.query(rule["expr"])
            if answer["status"] != "success":
                problems.append(f"rule {rule.get('alert') or rule.get('record')} does not evaluate")
            problems += [f"rule {rule.get('alert') or rule.get('record')} names {name}, which no target exports"
                         for name in promql.metric_names(rule["expr"]) - seen]
        unhealthy = [r["name"] for g in prom.get("/api/v1/rules")["groups"] for r in g["rules"]
                     if r["health"] == "err"]
        assert problems == [] and unhealthy == []
        # The routed messages fed the intent drift tracker (small windows in the e2e mesh, conftest.py).
        assert prom.series('aios_intent_drift_score{tenant="demo"}'), "no intent drift score for the demo tenant"
        # Shown with -s; the README's observability section lists what these mean.
        print(f"panels showing only their `or vector(0)` fallback in this run: {sorted(set(fallbacks))}")
