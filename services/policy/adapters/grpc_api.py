"""PolicyService over gRPC: wire messages <-> domain objects, nothing else.
Errors raised below become status codes in the shared interceptor. Decisions
and reconciles are the planner's (EvaluatePolicy, ReconcileBudget: a service
token with policy-client); a budget may also be read by its tenant's viewers
(services.common.authz).

Each check gets a span ("policy evaluate"): in an EvaluateBatch, which serves many runs in one
call, it continues the check's own run trace (``trace_context``) and links to the call's server
span, so every run's trace shows its own decision and the audit record it caused."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace

from aiosmesh.v1 import policy_pb2, policy_pb2_grpc
from services.common import authz, tracing
from services.common.amounts import AmountField
from services.common.errors import InvalidArgument, PermanentError
from services.common.logs import log_context
from services.policy import handlers
from services.policy.domain.decide import build_request
from services.policy.domain.model import BudgetState, Decision, PolicyRequest

SERVICE_NAME = "aiosmesh.v1.PolicyService"


def decision_to_pb(decision: Decision) -> policy_pb2.Decision:
    masked = "" if decision.masked_inputs is None else json.dumps(decision.masked_inputs, separators=(",", ":"))
    return policy_pb2.Decision(effect=decision.effect, reasons=list(decision.reasons), policy_id=decision.policy_id,
                               approval_role=decision.approval_role, masked_inputs_json=masked,
                               model_tier=decision.model_tier, reservation_id=decision.reservation_id)


def request_from_pb(request: policy_pb2.EvaluateRequest, tenant: str,
                    amount_fields: Mapping[str, AmountField]) -> PolicyRequest:
    """The wire request as a validated domain request; an unset amount is missing, not 0."""
    return build_request(tenant=tenant, action=request.action, principal=request.principal,
                         workflow=request.workflow, step_id=request.step_id, tool=request.tool,
                         resource=request.resource, amount=request.amount if request.HasField("amount") else None,
                         cost_estimate=request.cost_estimate, inputs_json=request.inputs_json,
                         run_id=request.run_id, reservation_id=request.reservation_id, amount_fields=amount_fields,
                         recheck_budget=request.recheck_budget)


def _json_value(text: str, index: int) -> Any:
    try:
        return json.loads(text or "null")
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"items[{index}].inputs_json is not JSON ({exc}); send a JSON value, "
                              "e.g. '{\"text\": \"...\"}'") from None


def budget_to_pb(state: BudgetState) -> policy_pb2.Budget:
    return policy_pb2.Budget(tenant=state.tenant, limit=state.limit, reserved=state.reserved, spent=state.spent,
                             remaining=state.remaining)


@contextmanager
def _check_span(request: Any, name: str = "policy evaluate") -> Iterator[None]:
    """The span of one check (or settlement): in its run's trace when the request carries it (linked
    to the call's span), else a child of the call's span; log lines inside name the run."""
    attributes = {"aios.run_id": request.run_id, "aios.step_id": request.step_id, "aios.tenant": request.tenant,
                  "aios.policy.action": getattr(request, "action", "reconcile")}
    carrier = dict(request.trace_context)
    if carrier.get("traceparent"):
        span = tracing.span_from_headers(name, carrier, kind=trace.SpanKind.INTERNAL,
                                         links=tracing.links_to((), also=trace.get_current_span()), **attributes)
    else:
        span = tracing.span_from_headers(name, tracing.inject(), kind=trace.SpanKind.INTERNAL, **attributes)
    with span as trace_id, log_context(run_id=request.run_id, tenant=request.tenant, trace_id=trace_id):
        yield


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):  # type: ignore[misc]  # generated, untyped
    def __init__(self, ctx: handlers.PolicyContext) -> None:
        self.ctx = ctx

    def Evaluate(self, request: policy_pb2.EvaluateRequest, context: Any) -> policy_pb2.Decision:  # noqa: N802
        tenant = authz.require(context, "EvaluatePolicy", tenant=request.tenant).tenant
        with _check_span(request):
            return decision_to_pb(handlers.evaluate(self.ctx, self._request(request, tenant)))

    def EvaluateBatch(self, request: policy_pb2.EvaluateBatchRequest,  # noqa: N802
                      context: Any) -> policy_pb2.EvaluateBatchResponse:
        # Every tenant of the batch is authorized before any decision reserves budget.
        tenants = {r.tenant: authz.require(context, "EvaluatePolicy", tenant=r.tenant).tenant
                   for r in request.requests}
        decisions = []
        for r in request.requests:
            with _check_span(r):
                decisions.append(decision_to_pb(handlers.evaluate(self.ctx, self._request(r, tenants[r.tenant]))))
        return policy_pb2.EvaluateBatchResponse(decisions=decisions)

    def MaskInputs(self, request: policy_pb2.MaskRequest, context: Any) -> policy_pb2.MaskResponse:  # noqa: N802
        tenants = {i.tenant: authz.require(context, "EvaluatePolicy", tenant=i.tenant).tenant for i in request.items}
        items = [(tenants[item.tenant], _json_value(item.inputs_json, n)) for n, item in enumerate(request.items)]
        return policy_pb2.MaskResponse(masked_json=[json.dumps(v, separators=(",", ":"))
                                                    for v in handlers.mask_inputs(self.ctx, items)])

    def _request(self, request: policy_pb2.EvaluateRequest, tenant: str) -> PolicyRequest:
        return request_from_pb(request, tenant, self.ctx.amount_fields)

    def GetBudget(self, request: policy_pb2.GetBudgetRequest, context: Any) -> policy_pb2.Budget:  # noqa: N802
        tenant = authz.require(context, "ReadBudget", tenant=request.tenant).tenant
        return budget_to_pb(handlers.get_budget(self.ctx, tenant))

    def ReconcileBudget(self, request: policy_pb2.ReconcileRequest, context: Any) -> policy_pb2.Budget:  # noqa: N802
        tenant = authz.require(context, "ReconcileBudget", tenant=request.tenant).tenant
        return budget_to_pb(handlers.reconcile_budget(self.ctx, tenant, request.reservation_id,
                                                      request.actual_cost, run_id=request.run_id,
                                                      step_id=request.step_id))

    def ReconcileBudgetBatch(self, request: policy_pb2.ReconcileBatchRequest,  # noqa: N802
                             context: Any) -> policy_pb2.ReconcileBatchResponse:
        """Every settlement of a planner batch in one call, each answered on its own (a refused one is
        an error in its result); every tenant is authorized before any settles."""
        tenants = {r.tenant: authz.require(context, "ReconcileBudget", tenant=r.tenant).tenant for r in request.requests}
        results = []
        for r in request.requests:
            with _check_span(r, "policy reconcile"):
                try:
                    state = handlers.reconcile_budget(self.ctx, tenants[r.tenant], r.reservation_id, r.actual_cost,
                                                      run_id=r.run_id, step_id=r.step_id)
                except PermanentError as exc:  # this settlement only; a TransientError fails the call
                    results.append(policy_pb2.ReconcileResult(error=f"{exc.kind}: {exc}"))
                else:
                    results.append(policy_pb2.ReconcileResult(budget=budget_to_pb(state)))
        return policy_pb2.ReconcileBatchResponse(results=results)
