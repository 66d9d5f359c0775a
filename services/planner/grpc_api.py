"""WorkflowService: start, inspect and steer runs. Commands that change a run
go through the commands topic (keyed by run id), so the run's partition owner
applies them in order; this edge only validates and answers."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from aiosmesh.v1 import workflow_pb2, workflow_pb2_grpc
from services.common import authz
from services.common.errors import InvalidArgument, NotFound, PermanentError, PolicyDenied
from services.common.kafka import MeshProducer
from services.planner import wire
from services.planner.domain.state import RunState
from services.planner.handlers import run_id_for
from services.planner.listing import RunListing, run_filter
from services.planner.ports import PolicyGateway
from services.planner.store import RunQueries
from services.planner.workflows import Registry


class NotWaiting(PermanentError):
    """The run is not in a state that accepts this command (gRPC FAILED_PRECONDITION)."""


def _require(value: str, name: str, hint: str) -> str:
    if not value.strip():
        raise InvalidArgument(f"{name} is required: {hint}")
    return value


def run_view(run: RunState) -> workflow_pb2.Run:
    steps = [workflow_pb2.StepView(
        step_id=s.id, tool=s.tool, status=s.status + (f"/{s.compensation}" if s.compensation else ""),
        attempt=s.attempt, idempotency_key=s.idempotency_key, started_at_ms=s.started_at,
        finished_at_ms=s.finished_at, duration_ms=(s.finished_at - s.started_at) if s.finished_at and s.started_at
        else 0.0, cost=s.cost, output_json=json.dumps(s.output, default=str) if s.output is not None else "",
        error=f"{s.error_type}: {s.error}" if s.error else "", decision=s.decision, decided_by=s.decided_by,
        policy_id=s.policy_id, trace_id=s.trace_id)
        for s in run.steps.values()]
    return workflow_pb2.Run(
        run_id=run.run_id, tenant=run.tenant, workflow=run.workflow, workflow_version=run.version,
        status=run.status, created_at_ms=run.created_at, updated_at_ms=run.updated_at,
        finished_at_ms=run.finished_at, input_json=json.dumps(run.input, default=str),
        output_json=json.dumps(run.output, default=str) if run.output is not None else "",
        error=run.error or "", steps=steps, cost=run.cost, actor=run.actor, trace_id=trace_id(run))


def trace_id(run: RunState) -> str:
    """The run's trace id, from the W3C traceparent of what started it ("" when it carried none)."""
    parts = (run.trace or {}).get("traceparent", "").split("-")
    return parts[1] if len(parts) == 4 else ""


class WorkflowApi(workflow_pb2_grpc.WorkflowServiceServicer):
    def __init__(self, *, store: RunQueries, registry: Registry, producer: MeshProducer, policy: PolicyGateway,
                 default_tenant: str) -> None:
        self.store, self.registry, self.producer, self.policy = store, registry, producer, policy
        self.listing = RunListing(store.r)
        self.default_tenant = default_tenant

    def _grant(self, context: Any, action: str, request: Any, **resource: Any) -> authz.Grant:
        """Authorize ``action`` (Cedar, services.common.authz): the tenant is the principal's, never a
        free request field; another tenant is PERMISSION_DENIED."""
        grant = authz.require(context, action, tenant=request.tenant, **resource)
        return grant if grant.tenant else authz.Grant(grant.principal, self.default_tenant, grant.decision)

    def _tenant(self, context: Any, request: Any) -> str:
        """The tenant, checked against the principal's before anything of it is loaded."""
        return authz.tenant_for(context, request.tenant).tenant or self.default_tenant

    def _run(self, tenant: str, run_id: str) -> RunState:
        _require(run_id, "run_id", "pass the id printed by `aios start` or shown by `aios workflows list`")
        run = self.store.get(tenant, run_id) or self.store.load_pending(tenant, run_id)
        if run is None:
            raise NotFound(f"no run {run_id!r} for tenant {tenant!r}; list runs with `aios workflows list`")
        return run

    def _masked(self, tenant: str, reason: str) -> str:
        """A person's free text (why they approved, rejected or cancelled) goes into the run's events and
        the audit trail: masked like everything else that enters a run ("called 555-0100 ...")."""
        return str(self.policy.mask_many([(tenant, reason)])[0]) if reason else ""

    def _command(self, tenant: str, run_id: str, actor: str, kind: str,
                 body: dict[str, Any]) -> workflow_pb2.CommandAccepted:
        out = self.producer.send("commands", run_id, wire.command(tenant, run_id, actor, kind, body))
        self.producer.flush(10)
        return workflow_pb2.CommandAccepted(run_id=run_id, command_id=out.event_id)

    def StartWorkflow(self, request: Any, context: Any) -> workflow_pb2.StartWorkflowResponse:  # noqa: N802
        _require(request.workflow, "workflow", f"name one of {self.registry.names()}")
        wf = self.registry.latest(request.workflow)
        grant = self._grant(context, "StartWorkflow", request, workflow=wf.name)
        tenant = grant.tenant
        try:
            run_input = json.loads(request.input_json or "{}")
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"input_json is not valid JSON ({exc}); pass an object like '{{\"k\": 1}}'") from None
        if not isinstance(run_input, dict):
            raise InvalidArgument("input_json must be a JSON object, e.g. '{\"order_id\": \"o-1\"}'")
        actor = grant.actor_or(request.actor or "api")
        verdict = self.policy.may_start(tenant, actor, wf.name, "", run_input)
        # Raw PII never enters the run: the check's answer carries the input masked (asked apart only
        # of a policy service that did not send it).
        run_input = verdict.inputs if verdict.masked else self.policy.mask_many([(tenant, run_input)])[0]
        if verdict.effect == "deny":
            raise PolicyDenied(f"{actor} may not start {wf.name}: {'; '.join(verdict.reasons)}")
        run_id = run_id_for(tenant, request.request_id) if request.request_id else "run-" + uuid.uuid4().hex[:20]
        created = False
        if self.store.get(tenant, run_id) is None:
            now = time.time() * 1000
            created = self.store.mark_pending(RunState(run_id=run_id, tenant=tenant, workflow=wf.name,
                                                       version=wf.version, input=run_input, status="pending",
                                                       created_at=now, updated_at=now))
            # Publish even when a pending marker exists: an earlier attempt may have died before its
            # command was durable. The planner's start is idempotent by run id.
            # Checked once, here: the planner trusts a StartWorkflow on the (internal) commands topic.
            self._command(tenant, run_id, actor, "StartWorkflow", {
                "workflow": wf.name, "workflow_version": wf.version, "input_json": json.dumps(run_input)})
        return workflow_pb2.StartWorkflowResponse(run_id=run_id, created=created)

    def GetRun(self, request: Any, context: Any) -> workflow_pb2.Run:  # noqa: N802
        tenant = self._grant(context, "ReadRun", request, run_id=request.run_id).tenant
        return run_view(self._run(tenant, request.run_id))

    def ListRuns(self, request: Any, context: Any) -> workflow_pb2.ListRunsResponse:  # noqa: N802
        """One page, newest first, from the index of the filters' combination (services.planner.listing)."""
        run_filter("-", limit=request.limit)  # a bad limit is the caller's error before it is a permission one
        tenant = self._grant(context, "ReadRun", request).tenant
        flt = run_filter(tenant, workflow=request.workflow, status=request.status, actor=request.actor,
                         since_ms=request.created_after_ms, until_ms=request.created_before_ms, limit=request.limit)
        page = self.listing.page(flt, request.page_token)
        return workflow_pb2.ListRunsResponse(runs=[run_view(r) for r in self.store.runs(tenant, page.run_ids)],
                                             next_page_token=page.next_page_token, total=page.total)

    def _decision(self, context: Any, request: Any, command: str) -> workflow_pb2.CommandAccepted:
        # Only the tenant first: an approver who holds just the gate's role may not read runs.
        tenant = self._tenant(context, request)
        run = self._run(tenant, request.run_id)
        _require(request.step_id, "step_id", "name the step waiting for approval (see `aios workflows show RUN`)")
        step = run.steps.get(request.step_id)
        if step is None:
            raise NotFound(f"run {run.run_id} has no step {request.step_id!r}; steps: {sorted(run.steps)}")
        if step.status != "waiting_approval":
            raise NotWaiting(f"step {request.step_id} of run {run.run_id} is {step.status}, not waiting for approval")
        # The approver is the authenticated principal, and must hold the gate's role.
        grant = self._grant(context, command, request, run_id=run.run_id, workflow=run.workflow,
                            gate_role=step.approval_role)
        actor = _require(grant.actor_or(request.actor), "actor", "say who decides (--by)")
        return self._command(tenant, run.run_id, actor, command,
                             {"step_id": request.step_id, "reason": self._masked(tenant, request.reason)})

    def Approve(self, request: Any, context: Any) -> workflow_pb2.CommandAccepted:  # noqa: N802
        return self._decision(context, request, "ApproveStep")

    def Reject(self, request: Any, context: Any) -> workflow_pb2.CommandAccepted:  # noqa: N802
        return self._decision(context, request, "RejectStep")

    def Cancel(self, request: Any, context: Any) -> workflow_pb2.CommandAccepted:  # noqa: N802
        tenant = self._tenant(context, request)
        run = self._run(tenant, request.run_id)
        grant = self._grant(context, "CancelRun", request, run_id=run.run_id, workflow=run.workflow)
        if run.terminal:
            raise NotWaiting(f"run {run.run_id} already ended as {run.status}")
        return self._command(tenant, run.run_id, grant.actor_or(request.actor or "api"), "CancelRun",
                             {"reason": self._masked(tenant, request.reason)})

    def Signal(self, request: Any, context: Any) -> workflow_pb2.CommandAccepted:  # noqa: N802
        tenant = self._tenant(context, request)
        run = self._run(tenant, request.run_id)
        grant = self._grant(context, "SignalRun", request, run_id=run.run_id, workflow=run.workflow)
        _require(request.name, "name", "name the signal")
        try:
            payload = json.loads(request.payload_json or "null")
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"payload_json is not valid JSON ({exc}); send a JSON value, e.g. "
                                  "'{\"approved\": true}'") from None
        payload = self.policy.mask_many([(tenant, payload)])[0]  # a signal joins the run's input: masked too
        return self._command(tenant, run.run_id, grant.actor_or(request.actor or "api"), "SignalRun",
                             {"name": request.name, "payload_json": json.dumps(payload)})

    def ListWorkflows(self, request: Any, context: Any) -> workflow_pb2.ListWorkflowsResponse:  # noqa: N802
        authz.require(context, "ListWorkflows")
        return workflow_pb2.ListWorkflowsResponse(workflows=[
            workflow_pb2.WorkflowInfo(name=wf.name, version=wf.version, description=wf.description,
                                      trigger=json.dumps(wf.trigger), steps=[s.id for s in wf.steps])
            for wf in self.registry.all_latest()])
