"""Decisions: request validation, rule evaluation (most-restrictive), the
budget's say, and the pieces of budget arithmetic that need no store."""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from collections.abc import Mapping
from typing import Any

from services.common.amounts import AmountField
from services.common.errors import InvalidArgument
from services.policy.domain.masking import Tokenize, mask_value
from services.policy.domain.model import (
    ACTIONS,
    ALLOW,
    DENY,
    REQUIRE_APPROVAL,
    SEVERITY,
    BudgetCheck,
    BudgetState,
    Decision,
    PolicyRequest,
    PolicySet,
    RuleOutcome,
)

# Tenants become part of Redis keys inside a {hash tag}: keep them to a safe alphabet.
_TENANT = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
LOW_BUDGET_FRACTION = 0.2
LOW_BUDGET_TIER = "high_throughput"
MICROS = 1_000_000  # budgets are stored in integer micro-units so Redis arithmetic is exact


def validate_tenant(tenant: str) -> str:
    if not tenant:
        raise InvalidArgument("tenant is required")
    if not _TENANT.match(tenant):
        raise InvalidArgument(f"tenant {tenant!r} is invalid: use 1-64 letters, digits, '_', '.', '-'")
    return tenant


def _non_negative(name: str, value: float | None) -> float | None:
    """A number a caller sent: None (not sent) and NaN (sent as "I could not read it") stay unknown
    for the rules to fail closed on; a negative or infinite one is a caller's mistake."""
    if value is None or math.isnan(value):
        return None
    if not math.isfinite(value) or value < 0:
        raise InvalidArgument(f"{name} must be a finite number >= 0, got {value}")
    return value


def parse_inputs(inputs_json: str) -> Any:
    if not inputs_json:
        return None
    try:
        return json.loads(inputs_json)
    except ValueError as exc:
        raise InvalidArgument(f"inputs_json is not valid JSON: {exc}") from None


def build_request(*, tenant: str, action: str, principal: str = "", workflow: str = "", step_id: str = "",
                  tool: str = "", resource: str = "", amount: float | None = None, cost_estimate: float | None = 0.0,
                  inputs_json: str = "", run_id: str = "", reservation_id: str = "",
                  amount_fields: Mapping[str, AmountField] | None = None,
                  recheck_budget: bool = False) -> PolicyRequest:
    """Validate raw request fields; InvalidArgument says which one is wrong.

    The amount of a tool with a declared amount field (``services.common.amounts``) is read from
    its inputs in the declared unit: the number the connector will pay, whatever ``amount`` says.
    Other tools' amount is the caller's; either way a missing or unreadable one stays unknown."""
    validate_tenant(tenant)
    if action not in ACTIONS:
        raise InvalidArgument(f"unknown action {action!r}; expected one of {sorted(ACTIONS)}")
    if action == "run_step" and not tool:
        raise InvalidArgument("tool is required for action run_step")
    inputs = parse_inputs(inputs_json)
    unknown: list[tuple[str, str]] = []
    declared = (amount_fields or {}).get(tool) if action == "run_step" else None
    if declared is not None:
        value, why = declared.read(inputs)
        if value is None:
            unknown.append(("amount", f"amount of {tool}: {why}"))
    else:
        value = _non_negative("amount", amount)
        if value is None:
            unknown.append(("amount", "amount is missing" if amount is None else "amount is unreadable (not a number)"))
    cost = _non_negative("cost_estimate", cost_estimate)
    if cost is None:
        unknown.append(("cost_estimate", "cost_estimate is unreadable (not a number)"))
    return PolicyRequest(tenant=tenant, action=action, principal=principal, workflow=workflow, step_id=step_id,
                         tool=tool, resource=resource, amount=value, cost_estimate=cost, inputs=inputs,
                         run_id=run_id, reservation_id=reservation_id, unknown=tuple(unknown),
                         recheck_budget=recheck_budget and action == "run_step")


def evaluate_rules(policy: PolicySet, req: PolicyRequest) -> RuleOutcome:
    """Every rule is checked; the most restrictive matched effect wins
    (deny > require_approval > allow). The deciding rule is the first matched
    one with that effect; every matched rule is listed in the reasons."""
    matched = tuple(r for r in policy.rules if r.applies(req))
    if not matched:
        return RuleOutcome(effect=policy.default_effect,
                           reasons=(f"no rule matched; default effect {policy.default_effect}",),
                           policy_id=f"{policy.default_ref}:default", approval_role="", matched=())
    effect = max((r.effect for r in matched), key=SEVERITY.__getitem__)
    deciding = next(r for r in matched if r.effect == effect)
    role = deciding.role if effect == REQUIRE_APPROVAL else ""
    return RuleOutcome(effect=effect, reasons=tuple(r.explain(req) for r in matched), policy_id=deciding.policy_id,
                       approval_role=role, matched=matched)


def budget_recheck_outcome(policy: PolicySet) -> RuleOutcome:
    """The rules' part of an approved step's budget re-check: they were asked before the approval,
    and the person's approval is what they asked for."""
    return RuleOutcome(effect=ALLOW, reasons=("approved by a person: only the budget is checked again",),
                       policy_id=f"{policy.default_ref}:approved", approval_role="", matched=())


def needs_reservation(req: PolicyRequest) -> bool:
    return req.action == "run_step" and (req.cost_estimate or 0.0) > 0


def derived_reservation_id(req: PolicyRequest) -> str:
    """The caller's id, else one derived from run and step so a retried
    Evaluate for the same step hits the same reservation; empty if neither."""
    if req.reservation_id:
        return req.reservation_id
    if req.run_id and req.step_id:
        return f"{req.run_id}:{req.step_id}"
    return ""


def window_id(window: str, now_ms: int) -> str:
    """The budget window a moment falls in (UTC): d20250131, m202501 or total."""
    if window == "total":
        return "total"
    at = dt.datetime.fromtimestamp(now_ms / 1000, tz=dt.UTC)
    return at.strftime("d%Y%m%d") if window == "day" else at.strftime("m%Y%m")


def window_ttl_s(window: str) -> int:
    """How long a window's counters are kept (0 = forever): past its end, with a margin for late reconciles."""
    return {"day": 3 * 86400, "month": 62 * 86400}.get(window, 0)


# Redis Lua numbers are doubles: micro-units stay exact up to 2**53 (about 9 billion currency units).
MAX_AMOUNT = 2**53 // MICROS


def to_micros(amount: float) -> int:
    """An amount in integer micro-units; one beyond what Redis counts exactly is an InvalidArgument."""
    if not abs(amount) <= MAX_AMOUNT:
        raise InvalidArgument(f"amount {amount:g} is beyond what a budget counts exactly: at most {MAX_AMOUNT} "
                              "currency units per cost, estimate or limit")
    return int(round(amount * MICROS))


def from_micros(micros: int | float | str) -> float:
    return int(micros) / MICROS


def fmt_amount(value: float) -> str:
    return f"{value:.6g}"


def budget_exhausted_reason(state: BudgetState, needed: float) -> str:
    need = f"step needs {fmt_amount(needed)}" if needed > 0 else "a step without an estimate is still charged"
    return (f"budget exhausted: tenant {state.tenant} has {fmt_amount(state.remaining)} remaining of "
            f"{fmt_amount(state.limit)}, {need}")


def model_tier(state: BudgetState | None) -> str:
    """Downgrade to the cheaper tier once less than 20% of the budget is left."""
    if state is None:
        return ""
    low = state.limit <= 0 or state.remaining < LOW_BUDGET_FRACTION * state.limit
    return LOW_BUDGET_TIER if low else ""


def decide(policy: PolicySet, req: PolicyRequest, rules: RuleOutcome, budget: BudgetCheck | None,
           reservation_id: str, tokenize: Tokenize | None = None) -> Decision:
    """Combine the rules' outcome with the budget's answer into the final decision."""
    masked = mask_value(req.inputs, policy.pii, tokenize) if req.inputs is not None else None
    state = budget.state if budget else None
    if budget is not None and req.action == "run_step" and req.cost_estimate is None:
        why = f"{req.why_unknown('cost_estimate')}: the budget cannot hold it, so the step is denied (fail closed)"
        return Decision(effect=DENY, reasons=(*rules.reasons, why), policy_id=f"{budget.policy_ref}:budget",
                        approval_role="", masked_inputs=masked, model_tier="", reservation_id="", budget=state)
    if budget is not None and budget.exhausted:
        return Decision(effect=DENY, reasons=(*rules.reasons, budget_exhausted_reason(budget.state, budget.needed)),
                        policy_id=f"{budget.policy_ref}:budget", approval_role="", masked_inputs=masked,
                        model_tier="", reservation_id="", budget=state)
    return Decision(effect=rules.effect, reasons=rules.reasons, policy_id=rules.policy_id,
                    approval_role=rules.approval_role, masked_inputs=masked,
                    model_tier=model_tier(state) if rules.effect != DENY else "",
                    reservation_id=reservation_id if budget is not None and budget.needed > 0 else "",
                    budget=state)
