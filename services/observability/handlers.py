"""Consumed records -> audit entries and metrics, one batch at a time.

The batch is converted first (a malformed record fails it before anything is
written; the consumer loop then isolates and dead-letters the culprit), then
stored in one pipelined round trip. Metrics are observed only for entries the
store reports as new, so redelivery neither duplicates entries nor counts
twice.

Each record gets a span of its own, continuing the trace its headers carry (its run's) and
linked to the consumer loop's batch span: the batch span continues only the first record's
trace, so without these every other run's records would leave no trace of being stored."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace

from services.common import tracing
from services.common.catalog import Catalog
from services.common.errors import BadRecord
from services.common.kafka import Inbound, now_ms
from services.observability import metrics
from services.observability.adapters.audit_store import RedisAuditStore
from services.observability.adapters.drift_store import DriftStore
from services.observability.domain import drift
from services.observability.domain import entries as conv
from services.observability.domain import signals as sig
from services.observability.domain.entries import AuditEntry
from services.observability.domain.erasure import Eraser, forgotten_subject

log = logging.getLogger(__name__)

ROLES = ("audit", "workflow_events", "usage", "deadletters")


@dataclass
class ObservabilityContext:
    store: RedisAuditStore
    catalog: Catalog
    clock_ms: Callable[[], int] = now_ms
    drift: DriftStore | None = None


def _source(ctx: ObservabilityContext, value: Mapping[str, Any]) -> tuple[str, bool]:
    """The dead letter's source topic as a catalog role, and whether it is keyed by run id."""
    topic = str(value.get("source_topic") or "")
    role = ctx.catalog.role_of(topic)
    if role is None:
        return topic or sig.UNKNOWN, False
    return role, ctx.catalog.spec(role).key == "run_id"


def to_entry(ctx: ObservabilityContext, rec: Inbound) -> AuditEntry:
    value = rec.value
    if rec.role == "audit":
        return conv.from_audit_record(value)
    if rec.role == "workflow_events":
        return conv.from_workflow_event(value)
    if rec.role == "usage":
        return conv.from_usage(value)
    if rec.role == "deadletters":
        role, run_keyed = _source(ctx, value)
        return conv.from_dead_letter(value, source_role=role, run_keyed=run_keyed)
    raise BadRecord(f"observability does not handle topic {rec.topic} (role {rec.role})")


def _run_facts(records: Sequence[Inbound]) -> list[tuple[str, str, str, str]]:
    """What later records of a run need to know: its workflow, each step's tool, when an approval
    was requested."""
    facts = []
    for rec in records:
        v = rec.value
        if rec.role != "workflow_events" or not v.get("run_id"):
            continue
        if v.get("type") == "RunStarted":
            facts.append((v["tenant"], v["run_id"], "workflow", str(v.get("workflow") or "")))
        elif v.get("type") == "StepDispatched" and v.get("step_id") and sig.step_tool(v):
            facts.append((v["tenant"], v["run_id"], f"tool:{v['step_id']}", sig.step_tool(v)))
        elif v.get("type") == "ApprovalRequested" and v.get("step_id"):
            at = v.get("occurred_at")
            facts.append((v["tenant"], v["run_id"], f"approval:{v['step_id']}",
                          str(int(at)) if isinstance(at, int | float) and not isinstance(at, bool) else ""))
    return facts


_DECIDES = ("ApprovalGranted", "ApprovalRejected", "ApprovalTimedOut")


def _lookups(records: Sequence[Inbound]) -> list[tuple[str, str, str] | None]:
    """Per record, the run fact its metrics need (None if none)."""
    out: list[tuple[str, str, str] | None] = []
    for rec in records:
        v = rec.value
        if rec.role == "usage" and v.get("run_id"):
            out.append((v["tenant"], v["run_id"], "workflow"))
        elif rec.role == "workflow_events" and v.get("type") in _DECIDES and v.get("step_id") and v.get("run_id"):
            out.append((v["tenant"], v["run_id"], f"approval:{v['step_id']}"))
        elif rec.role == "workflow_events" and v.get("step_id") and v.get("run_id") and not sig.step_tool(v):
            out.append((v["tenant"], v["run_id"], f"tool:{v['step_id']}"))
        else:
            out.append(None)
    return out


def _signals(rec: Inbound, fact: str) -> list[sig.Signal]:
    if rec.role == "workflow_events":
        if rec.value.get("type") in _DECIDES:
            return sig.workflow_signals(rec.value, requested_at_ms=float(fact) if fact.isdigit() else None)
        return sig.workflow_signals(rec.value, sig.step_tool(rec.value) or fact)
    if rec.role == "usage":
        return sig.usage_signals(rec.value, fact)
    if rec.role == "audit":
        return sig.audit_signals(rec.value)
    return []


def _dlq_change(ctx: ObservabilityContext, rec: Inbound) -> tuple[str, str, int] | None:
    if rec.role == "deadletters":
        role, _ = _source(ctx, rec.value)
        return role, str(rec.value.get("error_type") or sig.UNKNOWN), 1
    replay = sig.dlq_replay(rec.value) if rec.role == "audit" else None
    return (replay.source_role, replay.error_type, -replay.count) if replay else None


@contextmanager
def _record_spans(records: Sequence[Inbound]) -> Iterator[list[trace.Span]]:
    """A span per record over the batch's work, each in its record's trace and linked to the batch
    span; ended together (with the error, if the batch fails)."""
    batch = tracing.links_to((), also=trace.get_current_span())
    spans = [tracing.start_span(f"observability {rec.role}", rec.headers, links=batch, attributes={
        "aios.run_id": str(rec.value.get("run_id") or rec.key or ""), "aios.tenant": rec.tenant,
        "messaging.destination.name": rec.topic, "messaging.kafka.offset": rec.offset}) for rec in records]
    try:
        yield spans
    except BaseException as exc:
        for span in spans:
            span.record_exception(exc)
            span.set_status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}")
        raise
    finally:
        for span in spans:
            span.end()


def handle_records(ctx: ObservabilityContext, records: Sequence[Inbound]) -> None:
    """The consumer loop's handler for audit, workflow_events, usage and deadletters."""
    with _record_spans(records) as spans:
        _handle(ctx, records, spans)


def _handle(ctx: ObservabilityContext, records: Sequence[Inbound], spans: Sequence[trace.Span]) -> None:
    entries = [to_entry(ctx, rec) for rec in records]
    now_s = ctx.clock_ms() / 1000.0
    for rec, entry in zip(records, entries, strict=True):
        if entry.occurred_at_ms > 0:
            metrics.EVENT_LAG.labels(rec.role).observe(max(0.0, now_s - entry.occurred_at_ms / 1000.0))
    ctx.store.remember_runs(_run_facts(records))
    wanted = _lookups(records)
    found = iter(ctx.store.run_facts([w for w in wanted if w is not None]))
    facts = [next(found) if w is not None else "" for w in wanted]
    fresh = ctx.store.add(entries)
    dlq_changes = []
    for rec, fact, is_new, span in zip(records, facts, fresh, spans, strict=True):
        metrics.ENTRIES.labels(rec.role, "stored" if is_new else "duplicate").inc()
        span.set_attribute("aios.audit.stored", bool(is_new))
        if not is_new:
            continue
        for signal in _signals(rec, fact):
            metrics.observe(signal)
        change = _dlq_change(ctx, rec)
        if change is not None:
            dlq_changes.append(change)
    if dlq_changes:
        metrics.set_dlq_depths(ctx.store.add_dlq_depth(dlq_changes))
    _track_drift(ctx, records, fresh)
    _erase_forgotten(ctx, entries)


def _track_drift(ctx: ObservabilityContext, records: Sequence[Inbound], fresh: Sequence[bool]) -> None:
    """The intents the planner routed by (new ``run.routed`` audit records) -> drift streams and gauges."""
    if ctx.drift is None:
        return
    routed = [c for rec, is_new in zip(records, fresh, strict=True)
              if is_new and rec.role == "audit" and (c := drift.classified(rec.value)) is not None]
    if routed:
        ctx.drift.observe(routed)
        metrics.sync_drift(ctx.drift.scores())  # what every replica computed, not only this batch's streams


def _erase_forgotten(ctx: ObservabilityContext, entries: Sequence[AuditEntry]) -> None:
    """A data subject's erasure (memory.forget) reaches the audit trail: every stored entry of the tenant
    loses the subject's data. Done on redeliveries too: a crash after storing the erasure record and
    before the rewrite must not leave the subject in place (the rewrite is idempotent)."""
    for entry in entries:
        subject = forgotten_subject(entry)
        if subject is not None:
            eraser = Eraser(entry.tenant, subject, entry.event_id)
            n = ctx.store.rewrite(entry.tenant, eraser.mentions, eraser.erase)
            log.info("erased a data subject from %d audit entries of tenant %s", n, entry.tenant)
