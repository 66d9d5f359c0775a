"""``aios policy test CASES``: every case of a cases file decided by the Cedar
authorization policies, with the policies that made each decision.

A cases file is YAML (or JSON), a list of cases::

    - name: an approver of another tenant          # optional
      principal: {user: alice, tenants: [acme], roles: [fraud-ops]}   # or {service: planner, ...}
      action: ApproveStep                          # an action of policies/authz.cedarschema
      tenant: globex                               # the request's tenant ('' = the principal's)
      run_id: run-1                                # optional: run_id, workflow, subject, topic, gate_role
      gate_role: fraud-ops
      expect: deny                                 # optional: allow | deny

The policies are ``--policies`` (default: AIOS_AUTHZ_POLICY_FILE, the repo's
``policies/authz.cedar``) validated against ``--schema``. Exit 0 when the file
is valid and every expectation holds, 1 otherwise."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from services.common.auth import Principal
from services.common.authz import ACTIONS, Authorizer, Decision, PolicyFileError, resource_for

__all__ = ["CaseResult", "load_cases", "run_cases"]

_FIELDS = ("tenant", "run_id", "workflow", "subject", "topic")


class CasesError(ValueError):
    """The cases file is unreadable or a case is malformed (the message says which)."""


@dataclass(frozen=True)
class CaseResult:
    name: str
    principal: str
    action: str
    resource: str
    decision: Decision
    expect: str

    @property
    def effect(self) -> str:
        return "allow" if self.decision.allowed else "deny"

    @property
    def ok(self) -> bool:
        return not self.expect or self.expect == self.effect


def _principal(raw: Any, where: str) -> Principal:
    if not isinstance(raw, dict) or len({"user", "service"} & set(raw)) != 1:
        raise CasesError(f"{where}: principal must be a mapping with exactly one of user: or service:")
    kind = "user" if "user" in raw else "service"
    tenants, roles = raw.get("tenants", []), raw.get("roles", [])
    if not all(isinstance(v, list) and all(isinstance(x, str) for x in v) for v in (tenants, roles)):
        raise CasesError(f"{where}: tenants and roles must be lists of names")
    return Principal(kind=kind, name=str(raw[kind]), tenants=frozenset(tenants), roles=frozenset(roles),
                     default_tenant=str(raw.get("tenant", "")))


def load_cases(path: Path) -> list[dict[str, Any]]:
    """The cases of a file, each checked for shape; CasesError names the bad one."""
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise CasesError(f"{path}: cannot read the cases: {exc}") from None
    if not isinstance(doc, list) or not doc:
        raise CasesError(f"{path}: expected a non-empty list of cases")
    for i, case in enumerate(doc, 1):
        where = f"{path}: case {i}"
        if not isinstance(case, dict):
            raise CasesError(f"{where}: expected a mapping")
        if case.get("action") not in ACTIONS:
            raise CasesError(f"{where}: action {case.get('action')!r} is not one of {sorted(ACTIONS)}")
        if case.get("expect", "allow") not in ("allow", "deny"):
            raise CasesError(f"{where}: expect must be allow or deny")
        _principal(case.get("principal"), where)
    return doc


def run_cases(authorizer: Authorizer, cases: list[dict[str, Any]]) -> list[CaseResult]:
    """Decide every case with ``authorizer`` (the tenant defaults to the principal's, as at the edge)."""
    results = []
    for i, case in enumerate(cases, 1):
        who = _principal(case["principal"], f"case {i}")
        fields = {k: str(case.get(k, "")) for k in _FIELDS}
        fields["tenant"] = who.tenant_for(fields["tenant"])
        resource = resource_for(case["action"], **fields)
        context = {"gate_role": str(case.get("gate_role", ""))} \
            if case["action"] in ("ApproveStep", "RejectStep") else None
        decision = authorizer.decide(who, case["action"], resource, context)
        results.append(CaseResult(name=str(case.get("name", f"case {i}")), principal=who.id, action=case["action"],
                                  resource=f"{resource.type}::{resource.id}", decision=decision,
                                  expect=str(case.get("expect", ""))))
    return results


def render(results: list[CaseResult]) -> str:
    lines = []
    for r in results:
        mark = "ok  " if r.ok else "FAIL"
        by = ", ".join(r.decision.policies) or "no policy matched (default deny)"
        lines.append(f"{mark} {r.effect.upper():5} {r.principal} {r.action} {r.resource}  by {by}  [{r.name}]")
        if not r.ok:
            lines.append(f"     expected {r.expect}")
        lines += [f"     error: {e}" for e in r.decision.errors]
    failed = sum(not r.ok for r in results)
    lines.append(f"{len(results)} cases, {failed} not as expected")
    return "\n".join(lines)


def load_authorizer(policies: Path, schema: Path) -> Authorizer:
    """The policies to test, never reloaded; PolicyFileError carries every parse or validation error."""
    return Authorizer(policies, schema, reload_s=0)


__all__ += ["CasesError", "PolicyFileError", "load_authorizer", "render"]
