"""A handler that takes many runs' records in one batch keeps each run in its own trace: the
observability service's span per record, and the policy service's span per check of an
EvaluateBatch the planner sends for many runs at once (against the embedded broker and Redis,
with a real policy gRPC server in-process)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from infra.stack import procs
from services.common import tracing
from services.common.catalog import Catalog
from services.common.kafka import Inbound
from services.common.settings import load_settings
from services.common.uow import MemoryUnitOfWork
from services.observability.adapters.audit_store import RedisAuditStore
from services.observability.handlers import ObservabilityContext, handle_records
from services.planner import wire
from services.planner.domain.workflow import build
from services.planner.handlers import Planner
from services.planner.ports import PolicyGateway
from services.planner.store import MemoryDefinitions, RunStore
from services.planner.workflows import Registry
from services.policy.main import bootstrap as policy_bootstrap
from services.policy.settings import PolicySettings
from tests.integration.test_observability_service import uid, wf_event
from tests.span_capture import finished_spans
from tests.unit.planner_twins import RecordingPublisher
from tests.unit.test_planner_handlers import PAY

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
T0 = 1_800_000_000_000


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    with finished_spans("batch-traces-test") as exporter:
        yield exporter


def traceparent(trace_id: int, span_id: int) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-01"


def in_trace(spans: InMemorySpanExporter, trace_id: int) -> list[ReadableSpan]:
    return [s for s in spans.get_finished_spans() if s.context is not None and s.context.trace_id == trace_id]


def as_the_consumer_loop_would(records: list[Inbound], handle: Any) -> None:
    """The consumer loop's batch span continues the first record's trace; the handler runs inside it."""
    with tracing.span_from_headers(f"handle {records[0].role}", records[0].headers):
        handle(records)


def test_each_record_of_an_observability_batch_continues_its_own_trace(
        spans: InMemorySpanExporter, mesh_env: dict[str, str], infra: Any) -> None:
    import redis

    client = redis.Redis.from_url(mesh_env["AIOS_REDIS_URL"])
    ctx = ObservabilityContext(store=RedisAuditStore(client), catalog=Catalog(infra.topic_prefix))
    tenant, wf = uid("t"), uid("wf")
    runs = {uid("r"): (0xA0 + i, 0xB0 + i) for i in range(3)}  # run -> (trace id, the producer's span id)
    records = [Inbound(topic="t.workflow_events", role="workflow_events", partition=0, offset=n, key=run,
                       schema="aiosmesh.v1.WorkflowEvent", value=wf_event(tenant, run, wf, "RunStarted", T0 + n, event_id=uid("e")),
                       headers={"traceparent": traceparent(*ids)}, idempotency_key=f"{run}:{n}")
               for n, (run, ids) in enumerate(runs.items())]
    try:
        as_the_consumer_loop_would(records, lambda recs: handle_records(ctx, recs))
    finally:
        client.close()
    for run, (trace_id, span_id) in runs.items():
        mine = [s for s in in_trace(spans, trace_id) if s.name.startswith("observability")]
        assert mine, f"run {run}: no observability span in its trace {trace_id:032x}"
        assert all(s.parent is not None and s.parent.span_id == span_id for s in mine), \
            f"run {run}: observability spans not children of the record's producer span"
        assert {(s.attributes or {}).get("aios.run_id") for s in mine} == {run}


@pytest.fixture
def policy(mesh_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    (tmp_path / "test.yaml").write_text("id: test\nversion: 1\nbudgets:\n  \"*\": {limit: 100.0, window: total}\n"
                                        "rules: []\n")
    address = f"127.0.0.1:{procs.free_port()}"
    monkeypatch.setenv("AIOS_POLICY_ADDR", address)
    monkeypatch.setenv("AIOS_POLICY_METRICS_PORT", "0")
    monkeypatch.setenv("AIOS_POLICY_DIR", str(tmp_path))
    rt = policy_bootstrap(load_settings(PolicySettings))
    try:
        yield address
    finally:
        rt.shutdown()


def starts(publisher: RecordingPublisher, tenant: str, runs: dict[str, tuple[int, int] | None]) -> list[Inbound]:
    """StartWorkflow commands of ``pay``, each on the trace given (None: no trace context)."""
    out = []
    for n, (run_id, ids) in enumerate(runs.items()):
        rec = publisher.inbound("commands", run_id, wire.command(
            tenant, run_id, "api:ann", "StartWorkflow",
            {"workflow": "pay", "workflow_version": 1, "input_json": json.dumps({"customer": "c"})}), n)
        headers = {k: v for k, v in rec.headers.items() if k != "traceparent"}
        out.append(dataclasses.replace(rec, headers={**headers, **({"traceparent": traceparent(*ids)} if ids else {})}))
    return out


def planner_for(policy: str) -> tuple[Planner, RecordingPublisher]:
    publisher = RecordingPublisher()
    return Planner(runs=RunStore(MemoryUnitOfWork()), definitions=MemoryDefinitions(),
                   registry=Registry([build(PAY)]), publisher=publisher, policy=PolicyGateway(policy, 10.0),
                   classifier=None), publisher


def test_each_check_of_an_evaluate_batch_continues_its_runs_trace(spans: InMemorySpanExporter,
                                                                   policy: str) -> None:
    """The planner asks policy once for the first step of three runs, each started on its own trace."""
    planner, publisher = planner_for(policy)
    runs = {uid("run-"): (0xC0 + i, 0xD0 + i) for i in range(3)}
    as_the_consumer_loop_would(starts(publisher, uid("t"), dict(runs)), planner.handle)
    assert len(publisher.decoded("step_requests")) == 3
    for run, (trace_id, span_id) in runs.items():
        checks = [s for s in in_trace(spans, trace_id) if s.name.startswith("policy evaluate")]
        assert checks, f"run {run}: no policy span in its trace {trace_id:032x} " \
                       f"(spans there: {[s.name for s in in_trace(spans, trace_id)]})"
        [check] = checks
        assert check.parent is not None and check.parent.span_id == span_id
        assert (check.attributes or {}).get("aios.run_id") == run
        assert (check.attributes or {}).get("aios.step_id") == "check"


def test_a_run_started_without_a_trace_gets_its_own(spans: InMemorySpanExporter, policy: str) -> None:
    """An untraced start: the planner roots the run's trace itself, and its check and records join it."""
    planner, publisher = planner_for(policy)
    runs: dict[str, tuple[int, int] | None] = {uid("run-"): None for _ in range(2)}
    as_the_consumer_loop_would(starts(publisher, uid("t"), runs), planner.handle)
    roots = {(s.attributes or {}).get("aios.run_id"): s for s in spans.get_finished_spans()
             if s.name == "planner run pay" and (s.attributes or {}).get("aios.run_id") in runs}
    assert set(roots) == set(runs)
    sent = {r.key: r.headers["traceparent"] for r in publisher.sent if r.topic == publisher.catalog.topic("step_requests")}
    for run, root in roots.items():
        assert root.parent is None and root.context is not None
        assert sent[run].split("-")[1] == f"{root.context.trace_id:032x}"
        [check] = [s for s in in_trace(spans, root.context.trace_id) if s.name == "policy evaluate"]
        assert check.parent is not None and check.parent.span_id == root.context.span_id
