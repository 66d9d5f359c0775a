"""PolicyService over gRPC: wire messages <-> domain objects, nothing else.
Errors raised below become status codes in the shared interceptor. Decisions
and reconciles are the planner's (EvaluatePolicy, ReconcileBudget: a service
token with policy-client); a budget may also be read by its tenant's viewers
(services.common.authz)."""

from __future__ import annotations

import json
from typing import Any

from aiosmesh.v1 import policy_pb2, policy_pb2_grpc
from services.common import authz
from services.policy import handlers
from services.policy.domain.decide import build_request
from services.policy.domain.model import BudgetState, Decision

SERVICE_NAME = "aiosmesh.v1.PolicyService"


def decision_to_pb(decision: Decision) -> policy_pb2.Decision:
    masked = "" if decision.masked_inputs is None else json.dumps(decision.masked_inputs, separators=(",", ":"))
    return policy_pb2.Decision(effect=decision.effect, reasons=list(decision.reasons), policy_id=decision.policy_id,
                               approval_role=decision.approval_role, masked_inputs_json=masked,
                               model_tier=decision.model_tier, reservation_id=decision.reservation_id)


def budget_to_pb(state: BudgetState) -> policy_pb2.Budget:
    return policy_pb2.Budget(tenant=state.tenant, limit=state.limit, reserved=state.reserved, spent=state.spent,
                             remaining=state.remaining)


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):  # type: ignore[misc]  # generated, untyped
    def __init__(self, ctx: handlers.PolicyContext) -> None:
        self.ctx = ctx

    def Evaluate(self, request: policy_pb2.EvaluateRequest, context: Any) -> policy_pb2.Decision:  # noqa: N802
        tenant = authz.require(context, "EvaluatePolicy", tenant=request.tenant).tenant
        return decision_to_pb(handlers.evaluate(self.ctx, self._request(request, tenant)))

    def EvaluateBatch(self, request: policy_pb2.EvaluateBatchRequest,  # noqa: N802
                      context: Any) -> policy_pb2.EvaluateBatchResponse:
        # Every tenant of the batch is authorized before any decision reserves budget.
        tenants = {r.tenant: authz.require(context, "EvaluatePolicy", tenant=r.tenant).tenant
                   for r in request.requests}
        return policy_pb2.EvaluateBatchResponse(decisions=[
            decision_to_pb(handlers.evaluate(self.ctx, self._request(r, tenants[r.tenant]))) for r in request.requests])

    @staticmethod
    def _request(request: policy_pb2.EvaluateRequest, tenant: str) -> Any:
        return build_request(tenant=tenant, action=request.action, principal=request.principal,
                            workflow=request.workflow, step_id=request.step_id, tool=request.tool,
                            resource=request.resource, amount=request.amount, cost_estimate=request.cost_estimate,
                            inputs_json=request.inputs_json, run_id=request.run_id,
                            reservation_id=request.reservation_id)

    def GetBudget(self, request: policy_pb2.GetBudgetRequest, context: Any) -> policy_pb2.Budget:  # noqa: N802
        tenant = authz.require(context, "ReadBudget", tenant=request.tenant).tenant
        return budget_to_pb(handlers.get_budget(self.ctx, tenant))

    def ReconcileBudget(self, request: policy_pb2.ReconcileRequest, context: Any) -> policy_pb2.Budget:  # noqa: N802
        tenant = authz.require(context, "ReconcileBudget", tenant=request.tenant).tenant
        return budget_to_pb(handlers.reconcile_budget(self.ctx, tenant, request.reservation_id,
                                                      request.actual_cost, run_id=request.run_id,
                                                      step_id=request.step_id))
