"""Kafka handler of the memory service: one thin function per memory-write kind.

Redelivery is expected (the consumer loop is at least once), so every write
carries its event id into Redis as a marker set in the same Lua script as the
effect: a redelivered record finds the marker and changes nothing."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from services.common import tracing
from services.common.kafka import Handler, Inbound
from services.common.logs import log_context
from services.memory import domain, metrics
from services.memory.domain import Episode, FactWrite, WorkingWrite
from services.memory.store import MemoryStore

log = logging.getLogger(__name__)


def apply_memory_write(store: MemoryStore, record: dict[str, Any], event_id: str, *,
                       working_ttl_s: int, episode_retention: int) -> bool:
    """Apply one MemoryWrite record; False when it had been applied before."""
    tenant = str(record.get("tenant") or "")
    write = domain.interpret_write(record)
    if isinstance(write, Episode):
        return record_episode(store, tenant, write, event_id, episode_retention)
    if isinstance(write, FactWrite):
        return put_fact(store, tenant, write, event_id)
    return set_working(store, tenant, write, event_id, working_ttl_s)


def record_episode(store: MemoryStore, tenant: str, episode: Episode, event_id: str, retention: int) -> bool:
    stream_id = store.record_episode(tenant, episode, event_id=event_id, retention=retention)
    if stream_id is None:
        metrics.WRITES_DUPLICATE.labels("episode").inc()
        return False
    metrics.EPISODES_RECORDED.labels(domain.outcome_label(episode.outcome)).inc()
    return True


def put_fact(store: MemoryStore, tenant: str, fact: FactWrite, event_id: str) -> bool:
    # Kafka fact writes are unconditional (expected_version -1): the writer has
    # no read-modify-write cycle to protect, and last-writer-wins per key is
    # what the run that emitted it meant.
    version = store.put_fact(tenant, fact.key, fact.value_json, expected_version=-1,
                             provenance_json=fact.provenance_json, subject=fact.subject, event_id=event_id)
    if version is None:
        metrics.WRITES_DUPLICATE.labels("fact").inc()
        return False
    return True


def set_working(store: MemoryStore, tenant: str, wm: WorkingWrite, event_id: str, ttl_s: int) -> bool:
    applied = store.set_working(tenant, wm.key, wm.value_json, ttl_s=ttl_s, subject=wm.subject,
                                event_id=event_id)
    if not applied:
        metrics.WRITES_DUPLICATE.labels("working").inc()
    return applied


def memory_writes_handler(store: MemoryStore, *, working_ttl_s: int, episode_retention: int) -> Handler:
    """The consumer-loop handler for the ``memory_writes`` topic."""

    def handle(records: Sequence[Inbound]) -> None:
        for rec in records:  # each write continues the trace of the run that sent it
            with tracing.span_from_headers("memory write", rec.headers) as trace_id, \
                    log_context(run_id=str(rec.value.get("run_id") or ""), tenant=rec.tenant, trace_id=trace_id):
                apply_memory_write(store, rec.value, rec.idempotency_key, working_ttl_s=working_ttl_s,
                                   episode_retention=episode_retention)

    return handle
