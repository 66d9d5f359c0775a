"""Authorization in Cedar (services.common.authz): the shipped policies validate against the schema,
the helper the servicers call decides each action as the matrix expects (including the planner's
actions, which its WorkflowService will call through the same helper), policies reload without a
restart and a broken file never replaces a good one, and `aios policy test` shows each decision with
the policies that made it."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common import authz
from services.common.auth import ANONYMOUS, Principal, acting_as
from services.common.authz import AccessDenied, Authorizer, PolicyFileError, require, tenant_for
from services.common.errors import InvalidArgument
from tools.aios.cli import main

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parents[2]
POLICIES, SCHEMA = REPO / "policies" / "authz.cedar", REPO / "policies" / "authz.cedarschema"


def user(name: str, *roles: str, tenants: tuple[str, ...] = ("acme",)) -> Principal:
    return Principal("user", name, frozenset(tenants), frozenset(roles))


def service(name: str, *roles: str) -> Principal:
    return Principal("service", name, frozenset({"*"}), frozenset(roles))


@pytest.fixture(autouse=True)
def shipped() -> Iterator[Authorizer]:
    instance = Authorizer(POLICIES, SCHEMA, reload_s=0)
    authz.install(instance)
    yield instance
    authz.install(None)


def test_the_shipped_policies_validate_against_the_schema(shipped: Authorizer) -> None:
    assert shipped.check(POLICIES.read_text()) == []


@pytest.mark.parametrize(("who", "action", "fields", "allowed"), [
    (user("otto", "operator"), "StartWorkflow", {"workflow": "order-recovery"}, True),
    (user("sam", "support-agent"), "StartWorkflow", {"workflow": "support-reply"}, True),
    (user("sam", "support-agent"), "StartWorkflow", {"workflow": "order-recovery"}, False),
    (user("vera", "viewer"), "StartWorkflow", {"workflow": "support-reply"}, False),
    (user("vera", "viewer"), "ReadRun", {"run_id": "r1"}, True),
    (user("vera", "viewer"), "ReadRun", {}, True),
    (user("sam", "support-agent"), "ReadRun", {"run_id": "r1"}, False),
    (user("alice", "fraud-ops"), "ApproveStep", {"run_id": "r1", "gate_role": "fraud-ops"}, True),
    (user("alice", "fraud-ops"), "RejectStep", {"run_id": "r1", "gate_role": "fraud-ops"}, True),
    (user("otto", "operator"), "ApproveStep", {"run_id": "r1", "gate_role": "fraud-ops"}, False),
    (user("alice", "fraud-ops"), "ApproveStep", {"run_id": "r1", "gate_role": "finance"}, False),
    (user("alice", "fraud-ops"), "ApproveStep", {"run_id": "r1", "gate_role": ""}, False),
    (service("planner", "fraud-ops"), "ApproveStep", {"run_id": "r1", "gate_role": "fraud-ops"}, False),
    (user("otto", "operator"), "CancelRun", {"run_id": "r1"}, True),
    (user("vera", "viewer"), "CancelRun", {"run_id": "r1"}, False),
    (user("otto", "operator"), "SignalRun", {"run_id": "r1"}, True),
    (user("vera", "viewer"), "ListWorkflows", {}, True),
    (user("nemo"), "ListWorkflows", {}, False),
    (user("otto", "operator"), "ReplayDeadLetter", {"topic": "aios.commands"}, True),
    (user("pia", "privacy-officer"), "EraseSubject", {"subject": "cust-1"}, True),
    (service("memory", "privacy-officer"), "EraseSubject", {"subject": "cust-1"}, False),
    (service("planner", "policy-client"), "EvaluatePolicy", {}, True),
    (service("executor", "memory-client"), "EvaluatePolicy", {}, False),
    (service("executor", "memory-client"), "ReadMemory", {}, True),
    (user("otto", "operator"), "EvaluatePolicy", {}, False),
])
def test_require_decides_each_action(who: Principal, action: str, fields: dict[str, str], allowed: bool) -> None:
    tenant = "acme"
    if allowed:
        grant = require(None, action, tenant=tenant, principal=who, **fields)
        assert grant.tenant == tenant and grant.principal == who and grant.decision is not None
    else:
        with pytest.raises(AccessDenied, match=f"{who.id} may not {action}"):
            require(None, action, tenant=tenant, principal=who, **fields)


def test_the_tenant_is_the_principals() -> None:
    alice = user("alice", "viewer", "fraud-ops")
    with acting_as(alice):
        assert require(None, "ReadRun").tenant == "acme"  # none named: its own
        with pytest.raises(AccessDenied, match="user:alice may not ReadRun in tenant 'globex': it acts for acme"):
            require(None, "ReadRun", tenant="globex")
        with pytest.raises(AccessDenied, match="may not act in tenant 'globex'"):
            tenant_for(None, "globex")
        assert tenant_for(None, "").tenant == "acme"
    both = user("bob", "viewer", tenants=("acme", "globex"))
    with pytest.raises(InvalidArgument, match="tenant is required: user:bob acts for several tenants"):
        require(None, "ReadRun", principal=both)
    assert require(None, "ReadRun", tenant="globex", principal=both).tenant == "globex"


def test_without_a_principal_it_denies_unless_authentication_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIOS_GRPC_AUTH", "mtls")
    with pytest.raises(AccessDenied, match="no authenticated principal"):
        require(None, "ReadMemory", tenant="acme")
    monkeypatch.setenv("AIOS_GRPC_AUTH", "none")
    grant = require(None, "ReadMemory", tenant="anything")
    assert grant.principal is ANONYMOUS and grant.tenant == "anything" and grant.actor_or("bob") == "bob"
    assert require(None, "ReadMemory", principal=user("a", "viewer")).actor_or("bob") == "user:a"


def _copy(tmp_path: Path) -> tuple[Path, Authorizer]:
    policy = tmp_path / "authz.cedar"
    shutil.copy(POLICIES, policy)
    return policy, Authorizer(policy, SCHEMA, reload_s=0)


def test_a_good_file_swaps_in_without_a_restart(tmp_path: Path) -> None:
    policy, auth = _copy(tmp_path)
    viewer, resource = user("vera", "viewer"), authz.resource_for("CancelRun", tenant="acme", run_id="r1")
    assert not auth.decide(viewer, "CancelRun", resource).allowed
    policy.write_text(policy.read_text() + '\n@id("viewers-cancel")\npermit (principal, action == '
                      'Aios::Action::"CancelRun", resource) when { principal.roles.contains("viewer") };\n')
    assert auth.reload() is True
    decision = auth.decide(viewer, "CancelRun", resource)
    assert decision.allowed and decision.policies == ("viewers-cancel",)


@pytest.mark.parametrize(("broken", "error"), [
    ("permit (principal, action, resource) when {", "does not parse"),
    ('@id("typo")\npermit (principal, action == Aios::Action::"ReadRun", resource) '
     'when { principal.rolez.contains("viewer") };', "policy typo"),
    ('permit (principal, action == Aios::Action::"FlyToTheMoon", resource);', "FlyToTheMoon"),
])
def test_a_broken_file_is_refused_and_the_previous_set_stays(tmp_path: Path, broken: str, error: str) -> None:
    policy, auth = _copy(tmp_path)
    viewer, resource = user("vera", "viewer"), authz.resource_for("ReadRun", tenant="acme", run_id="r1")
    assert auth.decide(viewer, "ReadRun", resource).allowed
    policy.write_text(broken)
    assert auth.reload() is False
    assert error in auth.last_error
    assert auth.decide(viewer, "ReadRun", resource).allowed  # still the previous set
    with pytest.raises(PolicyFileError, match=error):
        Authorizer(policy, SCHEMA)  # and a process starting with it refuses to start


def test_a_file_that_is_not_utf8_is_refused_and_the_previous_set_stays(tmp_path: Path) -> None:
    """Found by tests/fuzz/test_fuzz_cedar.py: a byte 0x80 in the file made the load (and every
    decision after a reload) raise UnicodeDecodeError instead of refusing the file."""
    policy, auth = _copy(tmp_path)
    viewer, resource = user("vera", "viewer"), authz.resource_for("ReadRun", tenant="acme", run_id="r1")
    policy.write_bytes(policy.read_bytes() + b"\n// caf\xe9\n")
    assert auth.reload() is False
    assert "not UTF-8 text" in auth.last_error
    assert auth.decide(viewer, "ReadRun", resource).allowed
    with pytest.raises(PolicyFileError, match="not UTF-8 text"):
        Authorizer(policy, SCHEMA)


def test_reload_is_checked_on_the_request_path(tmp_path: Path) -> None:
    policy = tmp_path / "authz.cedar"
    policy.write_text('@id("nothing")\nforbid (principal, action, resource);\n')
    auth = Authorizer(policy, SCHEMA, reload_s=0.001)
    viewer, resource = user("vera", "viewer"), authz.resource_for("ReadRun", tenant="acme")
    assert not auth.decide(viewer, "ReadRun", resource).allowed
    shutil.copy(POLICIES, policy)
    auth._checked = 0.0
    assert auth.decide(viewer, "ReadRun", resource).allowed


CASES = [
    {"name": "approver of the gate's role", "principal": {"user": "alice", "tenants": ["acme"], "roles": ["fraud-ops"]},
     "action": "ApproveStep", "run_id": "r1", "gate_role": "fraud-ops", "expect": "allow"},
    {"name": "another tenant", "principal": {"user": "alice", "tenants": ["acme"], "roles": ["fraud-ops"]},
     "action": "ApproveStep", "tenant": "globex", "run_id": "r1", "gate_role": "fraud-ops", "expect": "deny"},
    {"name": "an operator", "principal": {"user": "otto", "tenants": ["acme"], "roles": ["operator"]},
     "action": "ApproveStep", "run_id": "r1", "gate_role": "fraud-ops", "expect": "deny"},
]


def test_aios_policy_test_shows_each_decision_and_its_policies(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    cases = tmp_path / "cases.yaml"
    cases.write_text(json.dumps(CASES))
    assert main(["policy", "test", str(cases)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("ok   ALLOW user:alice ApproveStep Run::acme/r1  by gate-role-decides")
    assert lines[1].startswith("ok   DENY  user:alice ApproveStep Run::globex/r1  by tenant-isolation")
    assert lines[2].startswith("ok   DENY  user:otto ApproveStep Run::acme/r1  by no policy matched")
    assert main(["policy", "test", str(cases), "--json"]) == 0
    assert [r["policies"] for r in json.loads(capsys.readouterr().out)] == [["gate-role-decides"],
                                                                           ["tenant-isolation"], []]


def test_aios_policy_test_fails_on_a_wrong_expectation_or_a_broken_policy(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = tmp_path / "cases.yaml"
    cases.write_text(json.dumps([{**CASES[2], "expect": "allow"}]))
    assert main(["policy", "test", str(cases)]) == 1
    assert "FAIL DENY" in capsys.readouterr().out
    broken = tmp_path / "broken.cedar"
    broken.write_text("permit (principal, action, resource) when {")
    assert main(["policy", "test", str(cases), "--policies", str(broken)]) == 1
    assert "does not parse" in capsys.readouterr().err
    cases.write_text(json.dumps([{**CASES[0], "action": "Teleport"}]))
    assert main(["policy", "test", str(cases)]) == 1
    assert "action 'Teleport' is not one of" in capsys.readouterr().err


def test_decisions_are_cached_per_policy_set_and_a_reload_starts_afresh(tmp_path: Path) -> None:
    policy, auth = _copy(tmp_path)
    viewer, resource = user("vera", "viewer"), authz.resource_for("CancelRun", tenant="acme", run_id="r1")
    first = auth.decide(viewer, "CancelRun", resource)
    assert auth.decide(viewer, "CancelRun", resource) is first  # the same question, the same answer
    assert auth.decide(user("otto", "operator"), "CancelRun", resource).allowed != first.allowed  # not a key clash
    policy.write_text(policy.read_text() + '\n@id("viewers-cancel")\npermit (principal, action == '
                      'Aios::Action::"CancelRun", resource) when { principal.roles.contains("viewer") };\n')
    assert auth.reload() is True
    assert auth.decide(viewer, "CancelRun", resource).allowed and not first.allowed
