"""One thin function per PolicyService method: validated domain request in,
domain answer out, with the budget store, audit and metrics around it."""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from services.common.amounts import AmountField
from services.common.errors import InvalidArgument, NotFound
from services.common.kafka import now_ms
from services.common.pii_tokens import TokenVault
from services.policy import metrics
from services.policy.adapters.audit import AuditPublisher, decision_record, reconcile_record
from services.policy.adapters.budget_store import RedisBudgetStore
from services.policy.domain.decide import (
    budget_recheck_outcome,
    decide,
    derived_reservation_id,
    evaluate_rules,
    needs_reservation,
    validate_tenant,
)
from services.policy.domain.masking import Tokenize, mask_value
from services.policy.domain.model import (
    DENY,
    BudgetCheck,
    BudgetSpec,
    BudgetState,
    Decision,
    PolicyRequest,
    PolicySet,
)


@dataclass
class PolicyContext:
    """What the handlers need; built once by ``main.bootstrap``."""

    policy: PolicySet
    budgets: RedisBudgetStore
    audit: AuditPublisher
    clock_ms: Callable[[], int] = now_ms
    amount_fields: Mapping[str, AmountField] = field(default_factory=dict)  # tool -> its declared amount input
    vault: TokenVault | None = None  # seals pii.tokenize_fields; None: they are masked

    def tokenizer(self, tenant: str) -> Tokenize | None:
        """Seals a value for ``tenant`` (its own key, the tenant bound in as associated data)."""
        vault = self.vault
        return None if vault is None else (lambda value: vault.seal(tenant, value))


def evaluate(ctx: PolicyContext, req: PolicyRequest) -> Decision:
    """Rules first; a request they do not deny is checked (and reserved) against the budget."""
    started = time.perf_counter()
    rules = budget_recheck_outcome(ctx.policy) if req.recheck_budget else evaluate_rules(ctx.policy, req)
    budget, reservation_id = None, ""
    spec = ctx.policy.budget_for(req.tenant)
    if spec is not None and rules.effect != DENY:
        budget, reservation_id = _check_budget(ctx, req, spec)
    decision = decide(ctx.policy, req, rules, budget, reservation_id, ctx.tokenizer(req.tenant))
    ctx.audit.publish(req.run_id or req.tenant, decision_record(req, decision))
    if budget is not None:
        _observe_budget(budget.state)
    metrics.decided(req.tenant, req.action, decision.effect, budget_exhausted=budget is not None and budget.exhausted,
                    seconds=time.perf_counter() - started)
    return decision


def mask_inputs(ctx: PolicyContext, items: list[tuple[str, Any]]) -> list[Any]:
    """The pii block applied to each (tenant, JSON value): what may enter a run's state."""
    for tenant, _value in items:
        validate_tenant(tenant)
    return [mask_value(value, ctx.policy.pii, ctx.tokenizer(tenant)) for tenant, value in items]


def _check_budget(ctx: PolicyContext, req: PolicyRequest, spec: BudgetSpec) -> tuple[BudgetCheck, str]:
    # A step that needs approval is reserved too: once approved it must be able
    # to run, and asking a person to approve what the budget cannot pay is noise.
    # The planner releases the hold with ReconcileBudget(actual_cost=0) on reject.
    if not needs_reservation(req):
        state = ctx.budgets.read(req.tenant, spec, ctx.clock_ms())
        # A step without an estimate is still metered (the planner settles its actual cost), so it
        # may not start once nothing is left: spend above an earlier estimate stops the next step.
        exhausted = req.action == "run_step" and state.remaining <= 0
        return BudgetCheck(state=state, policy_ref=spec.policy_ref, exhausted=exhausted), ""
    reservation_id = derived_reservation_id(req) or uuid.uuid4().hex
    cost = req.cost_estimate or 0.0
    ok, state = ctx.budgets.reserve(req.tenant, spec, reservation_id, cost, ctx.clock_ms())
    return BudgetCheck(state=state, policy_ref=spec.policy_ref, needed=cost,
                       exhausted=not ok), reservation_id


def _budget_spec(ctx: PolicyContext, tenant: str) -> BudgetSpec:
    validate_tenant(tenant)
    spec = ctx.policy.budget_for(tenant)
    if spec is None:
        raise NotFound(f"no budget is configured for tenant {tenant!r} (add it, or '*', under budgets: "
                       "in a policy file)")
    return spec


def get_budget(ctx: PolicyContext, tenant: str) -> BudgetState:
    state = ctx.budgets.read(tenant, _budget_spec(ctx, tenant), ctx.clock_ms())
    _observe_budget(state)
    return state


def reconcile_budget(ctx: PolicyContext, tenant: str, reservation_id: str, actual_cost: float, *,
                     run_id: str = "", step_id: str = "") -> BudgetState:
    """Record what a step really cost; the same reservation twice counts once. A tenant without a
    budget has nothing to settle: a no-op (it was NOT_FOUND, which failed the planner's transition)."""
    validate_tenant(tenant)
    if not math.isfinite(actual_cost) or actual_cost < 0:
        raise InvalidArgument(f"actual_cost must be a finite number >= 0, got {actual_cost}")
    spec = ctx.policy.budget_for(tenant)
    if spec is None:
        return BudgetState(tenant=tenant, limit=0.0, spent=0.0, reserved=0.0)
    applied, state = ctx.budgets.reconcile(tenant, spec, reservation_id, actual_cost, ctx.clock_ms())
    ctx.audit.publish(run_id or tenant, reconcile_record(tenant, reservation_id, actual_cost, applied, state,
                                                         run_id=run_id, step_id=step_id))
    _observe_budget(state)
    return state


def _observe_budget(state: BudgetState) -> None:
    metrics.budget_seen(state.tenant, state.remaining, state.limit, reserved=state.reserved)
