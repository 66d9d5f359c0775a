"""Policy domain objects: what a policy file means once parsed, what a request
asks and what the service answers. Pure data and matching; no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

ALLOW, REQUIRE_APPROVAL, DENY = "allow", "require_approval", "deny"
# Most-restrictive combination: the effect with the highest severity among all
# matched rules wins, so adding a rule can only make a decision stricter.
SEVERITY = {ALLOW: 0, REQUIRE_APPROVAL: 1, DENY: 2}
ACTIONS = frozenset({"start_workflow", "run_step"})
MATCH_FIELDS = ("tenant", "principal", "action", "workflow", "tool", "resource")
# `when` keys: (request attribute, comparison).
THRESHOLD_KEYS: dict[str, tuple[str, str]] = {
    "amount_gt": ("amount", "gt"), "amount_gte": ("amount", "gte"),
    "amount_lt": ("amount", "lt"), "amount_lte": ("amount", "lte"),
    "cost_gt": ("cost_estimate", "gt"), "cost_gte": ("cost_estimate", "gte"),
    "cost_lt": ("cost_estimate", "lt"), "cost_lte": ("cost_estimate", "lte"),
}
WINDOWS = ("day", "month", "total")
MASK_PATTERNS = ("email", "card_number", "phone", "iban")


@dataclass(frozen=True)
class PolicyRequest:
    """One action to check, already validated."""

    tenant: str
    action: str
    principal: str = ""
    workflow: str = ""
    step_id: str = ""
    tool: str = ""
    resource: str = ""
    # None = unknown: the caller sent none, or what it sent could not be read as a number. A rule
    # that needs an unknown value fails closed (``Thresholds.hold``); ``unknown`` says why, per attribute.
    amount: float | None = None
    cost_estimate: float | None = 0.0
    inputs: Any = None
    run_id: str = ""
    reservation_id: str = ""
    unknown: tuple[tuple[str, str], ...] = ()
    # An approved step asks again before it runs: only its budget is checked (and its hold reserved
    # again if it expired while the gate was open); the rules had their say before the approval.
    recheck_budget: bool = False

    def why_unknown(self, attr: str) -> str:
        return next((why for name, why in self.unknown if name == attr), f"{attr} is missing")


@dataclass(frozen=True)
class Match:
    """Field -> glob patterns; a field matches if any of its patterns does, the
    match holds if every listed field matches (an empty match holds always)."""

    patterns: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def holds(self, req: PolicyRequest) -> bool:
        return all(any(fnmatchcase(str(getattr(req, name)), p) for p in globs) for name, globs in self.patterns)

    def describe(self) -> str:
        return " ".join(f"{name}={'|'.join(globs)}" for name, globs in self.patterns) or "any request"


@dataclass(frozen=True)
class Thresholds:
    """Numeric conditions on amount / cost estimate; all must hold."""

    bounds: tuple[tuple[str, str, float], ...] = ()

    def hold(self, req: PolicyRequest, *, fail_closed: bool) -> bool:
        """Whether every bound holds. A bound on an unknown value (missing, or not a number) holds
        when ``fail_closed`` (the rule restricts: it must not be escaped by sending garbage) and
        fails otherwise (an allow rule is never earned by an amount nobody could read)."""
        for attr, op, limit in self.bounds:
            value = getattr(req, attr)
            if value is None:
                if not fail_closed:
                    return False
                continue
            ok = {"gt": value > limit, "gte": value >= limit, "lt": value < limit, "lte": value <= limit}[op]
            if not ok:
                return False
        return True

    def attrs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(attr for attr, _op, _limit in self.bounds))

    def describe(self) -> str:
        signs = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
        return " and ".join(f"{attr} {signs[op]} {limit:g}" for attr, op, limit in self.bounds)


@dataclass(frozen=True)
class Rule:
    id: str
    effect: str
    policy_ref: str                  # "<file id>@v<version>", for policy ids in decisions
    match: Match = field(default_factory=Match)
    unless: Match | None = None      # the rule does not apply when this matches (allow-lists)
    when: Thresholds = field(default_factory=Thresholds)
    role: str = ""
    reason: str = ""

    @property
    def policy_id(self) -> str:
        return f"{self.policy_ref}:{self.id}"

    def applies(self, req: PolicyRequest) -> bool:
        if not self.match.holds(req) or not self.when.hold(req, fail_closed=self.effect != ALLOW):
            return False
        return self.unless is None or not self.unless.holds(req)

    def explain(self, req: PolicyRequest | None = None) -> str:
        """Why this rule matched, for the decision's reasons and the audit trail: the rule's reason
        (or what it matched), and the values its thresholds saw, or why one was unknown."""
        why = self.reason
        if not why:
            why = f"matched {self.match.describe()}"
            if self.when.bounds:
                why += f" when {self.when.describe()}"
        if req is not None and self.when.bounds:
            seen = [f"{attr} {value:g}" if (value := getattr(req, attr)) is not None
                    else f"{req.why_unknown(attr)}, so the rule applies (fail closed)"
                    for attr in self.when.attrs()]
            why += f" ({'; '.join(seen)})"
        return f"{self.id}: {self.effect}: {why}"


@dataclass(frozen=True)
class BudgetSpec:
    """A tenant's spending limit per window; "*" gives every other tenant its own."""

    limit: float
    window: str
    policy_ref: str


@dataclass(frozen=True)
class PiiSpec:
    mask_fields: frozenset[str] = frozenset()
    mask_patterns: tuple[str, ...] = ()
    # Fields whose values a connector needs: sealed as reversible per-tenant tokens, not masked.
    tokenize_fields: frozenset[str] = frozenset()


@dataclass(frozen=True)
class PolicyFile:
    id: str
    version: int
    source: str
    rules: tuple[Rule, ...]
    budgets: dict[str, BudgetSpec]
    pii: PiiSpec
    default_effect: str

    @property
    def ref(self) -> str:
        return f"{self.id}@v{self.version}"


@dataclass(frozen=True)
class PolicySet:
    """Every loaded file, combined: rules in file order then rule order."""

    files: tuple[PolicyFile, ...]
    rules: tuple[Rule, ...]
    budgets: dict[str, BudgetSpec]
    pii: PiiSpec
    default_effect: str
    default_ref: str

    def budget_for(self, tenant: str) -> BudgetSpec | None:
        return self.budgets.get(tenant) or self.budgets.get("*")


@dataclass(frozen=True)
class RuleOutcome:
    """What the rules alone say, before budgets."""

    effect: str
    reasons: tuple[str, ...]
    policy_id: str
    approval_role: str
    matched: tuple[Rule, ...]


@dataclass(frozen=True)
class BudgetState:
    """A tenant's budget in the current window, in currency units."""

    tenant: str
    limit: float
    spent: float
    reserved: float

    @property
    def remaining(self) -> float:
        # Amounts are exact to the micro-unit; rounding keeps 1.0 - 0.8 at 0.2, not 0.19999999999999996.
        return max(0.0, round(self.limit - self.spent - self.reserved, 6))


@dataclass(frozen=True)
class BudgetCheck:
    """The budget's answer for one request: the state after any reservation."""

    state: BudgetState
    policy_ref: str
    needed: float = 0.0
    exhausted: bool = False


@dataclass(frozen=True)
class Decision:
    effect: str
    reasons: tuple[str, ...]
    policy_id: str
    approval_role: str
    masked_inputs: Any
    model_tier: str
    reservation_id: str
    budget: BudgetState | None = None
