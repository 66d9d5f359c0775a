"""AuditService over gRPC: wire messages <-> domain objects, nothing else. Both
methods need ReadAudit on the caller's tenant (services.common.authz)."""

from __future__ import annotations

from typing import Any

from aiosmesh.v1 import audit_pb2, audit_pb2_grpc
from services.common import authz
from services.common.errors import NotFound
from services.observability.adapters.audit_store import RedisAuditStore
from services.observability.domain.entries import AuditEntry
from services.observability.domain.query import build_filter, check_timeline

SERVICE_NAME = "aiosmesh.v1.AuditService"


def entry_to_pb(e: AuditEntry) -> audit_pb2.AuditEntry:
    return audit_pb2.AuditEntry(event_id=e.event_id, tenant=e.tenant, occurred_at_ms=e.occurred_at_ms,
                                service=e.service, run_id=e.run_id, step_id=e.step_id, action=e.action,
                                decision=e.decision, actor=e.actor, reason=e.reason, policy_id=e.policy_id,
                                model_version=e.model_version, cost=e.cost, detail_json=e.detail_json)


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):  # type: ignore[misc]  # generated, untyped
    def __init__(self, store: RedisAuditStore) -> None:
        self.store = store

    def Query(self, request: audit_pb2.AuditQuery, context: Any) -> audit_pb2.AuditQueryResponse:  # noqa: N802
        tenant = authz.require(context, "ReadAudit", tenant=request.tenant, run_id=request.run_id).tenant
        flt = build_filter(tenant, request.run_id, request.action, request.limit, actor=request.actor,
                           workflow=request.workflow, since_ms=request.since_ms, until_ms=request.until_ms)
        entries, token, total = self.store.query(flt, request.page_token)
        return audit_pb2.AuditQueryResponse(entries=[entry_to_pb(e) for e in entries], next_page_token=token,
                                            total=total)

    def Timeline(self, request: audit_pb2.TimelineRequest, context: Any) -> audit_pb2.TimelineResponse:  # noqa: N802
        tenant = authz.require(context, "ReadAudit", tenant=request.tenant, run_id=request.run_id).tenant
        check_timeline(tenant, request.run_id)
        entries = self.store.timeline(tenant, request.run_id)
        if not entries:
            raise NotFound(f"no audit entries for run {request.run_id!r} of tenant {tenant!r}: "
                           "unknown run, another tenant's run, or past the retention")
        return audit_pb2.TimelineResponse(run_id=request.run_id, entries=[entry_to_pb(e) for e in entries])
