"""Policy domain: parsing, matching, most-restrictive combination, thresholds,
budgets arithmetic and PII masking. Pure and fast."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from services.common.errors import ConfigError, InvalidArgument
from services.policy.adapters.policy_files import load_policy_dir
from services.policy.domain.decide import (
    budget_exhausted_reason,
    build_request,
    decide,
    derived_reservation_id,
    evaluate_rules,
    model_tier,
    window_id,
)
from services.policy.domain.masking import mask_value
from services.policy.domain.model import BudgetCheck, BudgetState, PiiSpec, PolicySet
from services.policy.domain.parse import combine, parse_policy_file

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(10)


def policy(rules: list[dict[str, Any]], **extra: Any) -> PolicySet:
    return combine([parse_policy_file({"id": "p", "version": 3, "rules": rules, **extra}, "p.yaml")])


def req(**kw: Any) -> Any:
    kw.setdefault("tenant", "demo")
    kw.setdefault("action", "run_step")
    kw.setdefault("tool", "x.y")
    return build_request(**kw)


BANK = [
    {"id": "card-block", "match": {"action": "run_step", "tool": "bank.block_card"},
     "effect": "require_approval", "role": "fraud-ops", "reason": "locks the customer out"},
    {"id": "refund-100", "match": {"tool": "commerce.refund"}, "when": {"amount_gt": 100},
     "effect": "require_approval", "role": "finance"},
    {"id": "refund-5000", "match": {"tool": "commerce.refund"}, "when": {"amount_gte": 5000}, "effect": "deny"},
    {"id": "bank-ok", "match": {"tool": "bank.*"}, "effect": "allow"},
]


# -- matching ------------------------------------------------------------------------
def test_glob_match_and_deciding_rule() -> None:
    out = evaluate_rules(policy(BANK), req(tool="bank.block_card"))
    assert out.effect == "require_approval"
    assert out.policy_id == "p@v3:card-block"
    assert out.approval_role == "fraud-ops"
    assert out.reasons == ("card-block: require_approval: locks the customer out",
                           "bank-ok: allow: matched tool=bank.*")


def test_no_match_uses_default_effect() -> None:
    out = evaluate_rules(policy(BANK), req(tool="support.reply"))
    assert (out.effect, out.policy_id) == ("allow", "p@v3:default")
    strict = policy(BANK, default_effect="deny")
    assert evaluate_rules(strict, req(tool="support.reply")).effect == "deny"


def test_match_on_tenant_principal_workflow_lists() -> None:
    p = policy([{"id": "r", "match": {"tenant": ["acme", "glob*"], "principal": "user:*",
                                      "workflow": "refund-?"}, "effect": "deny"}])
    assert evaluate_rules(p, req(tenant="globex", principal="user:ann", workflow="refund-1")).effect == "deny"
    assert evaluate_rules(p, req(tenant="demo", principal="user:ann", workflow="refund-1")).effect == "allow"
    assert evaluate_rules(p, req(tenant="acme", principal="workflow:x", workflow="refund-1")).effect == "allow"


def test_unless_makes_an_allow_list() -> None:
    p = policy([{"id": "known-tools", "match": {"action": "run_step"},
                 "unless": {"tool": ["bank.*", "support.*"]}, "effect": "deny"}])
    assert evaluate_rules(p, req(tool="bank.transfer")).effect == "allow"
    out = evaluate_rules(p, req(tool="shell.exec"))
    assert out.effect == "deny" and out.policy_id == "p@v3:known-tools"
    assert evaluate_rules(p, req(action="start_workflow", tool="")).effect == "allow"


# -- combination -------------------------------------------------------------------
def test_most_restrictive_wins_regardless_of_order() -> None:
    allow_first = policy([{"id": "ok", "match": {}, "effect": "allow"},
                          {"id": "ask", "match": {"tool": "x.*"}, "effect": "require_approval", "role": "a"},
                          {"id": "no", "match": {"tool": "x.y"}, "effect": "deny"}])
    out = evaluate_rules(allow_first, req())
    assert out.effect == "deny" and out.policy_id == "p@v3:no"
    assert out.approval_role == ""  # no approval role on a deny
    assert [r.split(":")[0] for r in out.reasons] == ["ok", "ask", "no"]


def test_first_rule_with_winning_effect_names_role() -> None:
    p = policy([{"id": "a", "match": {}, "effect": "require_approval", "role": "first"},
                {"id": "b", "match": {}, "effect": "require_approval", "role": "second"}])
    out = evaluate_rules(p, req())
    assert (out.policy_id, out.approval_role) == ("p@v3:a", "first")


def test_files_combine_rules_and_strictest_default() -> None:
    a = parse_policy_file({"id": "a", "version": 1, "default_effect": "allow",
                           "rules": [{"id": "r", "match": {"tool": "x.*"}, "effect": "allow"}]}, "a.yaml")
    b = parse_policy_file({"id": "b", "version": 2, "default_effect": "require_approval",
                           "rules": [{"id": "r", "match": {"tool": "x.y"}, "effect": "deny"}]}, "b.yaml")
    both = combine([a, b])
    assert evaluate_rules(both, req()).policy_id == "b@v2:r"
    out = evaluate_rules(both, req(tool="other"))
    assert (out.effect, out.policy_id) == ("require_approval", "b@v2:default")


# -- thresholds --------------------------------------------------------------------
@pytest.mark.parametrize(("amount", "effect"), [(0, "allow"), (100, "allow"), (100.01, "require_approval"),
                                                (4999.99, "require_approval"), (5000, "deny")])
def test_amount_thresholds(amount: float, effect: str) -> None:
    assert evaluate_rules(policy(BANK), req(tool="commerce.refund", amount=amount)).effect == effect


def test_cost_thresholds_and_explanations() -> None:
    p = policy([{"id": "pricey", "match": {}, "when": {"cost_gt": 5, "cost_lte": 50}, "effect": "deny"}])
    assert evaluate_rules(p, req(cost_estimate=5)).effect == "allow"
    out = evaluate_rules(p, req(cost_estimate=6))
    assert out.effect == "deny"
    assert out.reasons == ("pricey: deny: matched any request when cost_estimate > 5 and cost_estimate <= 50 "
                           "(cost_estimate 6)",)
    assert evaluate_rules(p, req(cost_estimate=51)).effect == "allow"


# -- bad files ---------------------------------------------------------------------
@pytest.mark.parametrize(("doc", "message"), [
    ({"version": 1}, "p.yaml: id: expected a non-empty string"),
    ({"id": "p", "version": 0}, "p.yaml: version: expected a positive integer"),
    ({"id": "p", "version": 1, "rulez": []}, "p.yaml: <top>: unknown key(s) ['rulez']"),
    ({"id": "p", "version": 1, "rules": [{"id": "a", "effect": "allow"}, {"id": "b", "effect": "maybe"}]},
     "p.yaml: rules[1].effect: expected one of"),
    ({"id": "p", "version": 1, "rules": [{"id": "a", "effect": "require_approval"}]},
     "p.yaml: rules[0].role: a require_approval rule must name the role"),
    ({"id": "p", "version": 1, "rules": [{"id": "a", "effect": "deny", "when": {"amount_gt": "lots"}}]},
     "p.yaml: rules[0].when.amount_gt: expected a number, got 'lots'"),
    ({"id": "p", "version": 1, "rules": [{"id": "a", "effect": "deny", "when": {"amount_over": 1}}]},
     "p.yaml: rules[0].when: unknown key(s) ['amount_over']"),
    ({"id": "p", "version": 1, "rules": [{"id": "a", "effect": "deny", "match": {"tools": "x"}}]},
     "p.yaml: rules[0].match: unknown key(s) ['tools']"),
    ({"id": "p", "version": 1, "rules": [{"id": "a", "effect": "deny", "match": {"action": "run"}}]},
     "p.yaml: rules[0].match.action: unknown action(s) ['run']"),
    ({"id": "p", "version": 1, "rules": [{"id": "a", "effect": "deny"}, {"id": "a", "effect": "deny"}]},
     "p.yaml: rules[1].id: duplicate rule id 'a'"),
    ({"id": "p", "version": 1, "budgets": {"demo": {"limit": -1}}}, "p.yaml: budgets.demo.limit: "),
    ({"id": "p", "version": 1, "budgets": {"demo": {"limit": 1, "window": "week"}}},
     "p.yaml: budgets.demo.window: expected one of"),
    ({"id": "p", "version": 1, "pii": {"mask_patterns": ["ssn"]}}, "p.yaml: pii.mask_patterns: unknown pattern"),
    (["not", "a", "mapping"], "p.yaml: <top>: expected a mapping, got list"),
])
def test_bad_documents_name_file_and_path(doc: Any, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_policy_file(doc, "p.yaml")
    assert message in str(err.value)


def test_bad_yaml_and_conflicting_files(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("id: a\nversion: 1\nrules: [\n")
    with pytest.raises(ConfigError, match=r"a\.yaml: invalid YAML"):
        load_policy_dir(tmp_path)
    (tmp_path / "a.yaml").write_text("id: a\nversion: 1\nbudgets: {demo: {limit: 1}}\n")
    (tmp_path / "b.yaml").write_text("id: b\nversion: 1\nbudgets: {demo: {limit: 2}}\n")
    with pytest.raises(ConfigError, match=r"b\.yaml: budgets\.demo: also budgeted in .*a\.yaml"):
        load_policy_dir(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no policy files in"):
        load_policy_dir(tmp_path / "empty")
    with pytest.raises(ConfigError, match="does not exist"):
        load_policy_dir(tmp_path / "missing")


def test_shipped_default_policy_parses() -> None:
    p = load_policy_dir(REPO / "policies")
    out = evaluate_rules(p, req(tool="bank.block_card"))
    assert (out.effect, out.approval_role, out.policy_id) == ("require_approval", "fraud-ops",
                                                             "default@v1:card-block-needs-human")
    assert p.budget_for("demo").limit == 50.0  # type: ignore[union-attr]
    assert p.budget_for("someone-else").limit == 10.0  # type: ignore[union-attr]


# -- request validation --------------------------------------------------------------
@pytest.mark.parametrize(("kw", "message"), [
    ({"tenant": ""}, "tenant is required"),
    ({"tenant": "a{b}"}, "tenant 'a{b}' is invalid"),
    ({"action": "launch"}, "unknown action 'launch'"),
    ({"amount": -1.0}, "amount must be a finite number >= 0"),
    ({"cost_estimate": float("inf")}, "cost_estimate must be a finite number >= 0"),
    ({"inputs_json": "{not json"}, "inputs_json is not valid JSON"),
    ({"tool": ""}, "tool is required for action run_step"),
])
def test_invalid_requests(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message.replace("{", r"\{").replace("}", r"\}")):
        req(**kw)


# -- budgets ---------------------------------------------------------------------------
def test_budget_denial_reason_and_tier() -> None:
    p = policy(BANK, budgets={"demo": {"limit": 10}})
    r = req(tool="bank.block_card", cost_estimate=3, run_id="r1", step_id="s1")
    state = BudgetState("demo", limit=10, spent=6, reserved=2)
    d = decide(p, r, evaluate_rules(p, r), BudgetCheck(state, "p@v3", needed=3, exhausted=True), "r1:s1")
    assert d.effect == "deny" and d.policy_id == "p@v3:budget" and d.reservation_id == ""
    assert d.reasons[-1] == "budget exhausted: tenant demo has 2 remaining of 10, step needs 3"
    ok = decide(p, r, evaluate_rules(p, r), BudgetCheck(state, "p@v3", needed=1), "r1:s1")
    assert (ok.effect, ok.model_tier, ok.reservation_id) == ("require_approval", "", "r1:s1")
    assert budget_exhausted_reason(BudgetState("t", 1, 0.25, 0), 0.875) == \
        "budget exhausted: tenant t has 0.75 remaining of 1, step needs 0.875"


@pytest.mark.parametrize(("spent", "tier"), [(0, ""), (8, ""), (8.01, "high_throughput"), (10, "high_throughput")])
def test_model_tier_below_twenty_percent(spent: float, tier: str) -> None:
    assert model_tier(BudgetState("t", 10, spent, 0)) == tier
    assert model_tier(None) == ""


def test_reservation_ids_and_windows() -> None:
    assert derived_reservation_id(req(reservation_id="given", run_id="r", step_id="s")) == "given"
    assert derived_reservation_id(req(run_id="r", step_id="s")) == "r:s"
    assert derived_reservation_id(req()) == ""
    at = 1_738_368_000_000  # 2025-02-01T00:00:00Z
    assert (window_id("day", at), window_id("month", at - 1), window_id("total", at)) == \
        ("d20250201", "m202501", "total")


# -- PII masking -------------------------------------------------------------------
PII = PiiSpec(frozenset({"email", "phone", "card_number", "iban", "ssn"}), ("email", "card_number", "phone", "iban"))


def test_mask_fields_anywhere_in_nested_json() -> None:
    data = {"customer": {"Email": "john.doe@example.com", "phone": "+44 7700 900123",
                         "cards": [{"card_number": "4111-1111-1111-1234"}], "ssn": "078-05-1120"},
            "iban": "DE89 3704 0044 0532 0130 00", "amount": 12.5}
    masked = mask_value(data, PII)
    assert masked == {"customer": {"Email": "j***@example.com", "phone": "+** **** ****23",
                                   "cards": [{"card_number": "****-****-****-1234"}], "ssn": "***"},
                      "iban": "**** **** **** **** **30 00", "amount": 12.5}
    assert data["customer"]["Email"] == "john.doe@example.com"  # the input is untouched


def test_mask_patterns_in_free_text() -> None:
    text = ("Hi, I'm jane@corp.io, card 4111 1111 1111 1234, call (555) 123-4567. "
            "Order 12345678 of 2024-01-15 10:30, total 1234.56")
    assert mask_value(text, PII) == ("Hi, I'm j***@corp.io, card **** **** **** 1234, call (***) ***-**67. "
                                     "Order 12345678 of 2024-01-15 10:30, total 1234.56")
    assert mask_value(4111111111111111, PII) == "************1111"
    assert mask_value({"note": "plain", "n": 3, "ok": True}, PII) == {"note": "plain", "n": 3, "ok": True}


def test_masking_only_what_the_policy_lists() -> None:
    only_email = PiiSpec(frozenset(), ("email",))
    assert mask_value("a@b.co 4111111111111111", only_email) == "a***@b.co 4111111111111111"
    assert mask_value({"email": {"nested": 1}}, PiiSpec(frozenset({"email"}), ())) == {"email": "***"}


@pytest.mark.parametrize("amount", [1.7976931348623158e302, -1e300, 1e10])
def test_an_amount_beyond_exact_micro_units_is_an_invalid_argument(amount: float) -> None:
    """Found by tests/fuzz/test_fuzz_grpc.py: ReconcileBudget(actual_cost=1.8e302) overflowed to
    infinity in to_micros and answered INTERNAL."""
    from services.policy.domain.decide import to_micros

    with pytest.raises(InvalidArgument, match="at most 9007199254"):
        to_micros(amount)
    assert to_micros(9_007_199_254.0) == 9_007_199_254_000_000
