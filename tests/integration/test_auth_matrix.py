"""Every gRPC method of the mesh x {no credential, other tenant, missing role, right role}, over mutual
TLS with tokens from the embedded issuer (services.common.pki), against the real servicers on Redis.

The planner's rows other than "no credential" (and ListWorkflows' right role, which holds already)
wait for the planner's WorkflowService to call ``authz.require`` (see docs/DECISIONS.md 32): they are
strict xfails, so wiring the planner turns them into failures until the markers come off."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from aiosmesh.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    memory_pb2,
    memory_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
    workflow_pb2,
    workflow_pb2_grpc,
)
from infra.stack import Stack
from services.common.auth import ClientAuth, TokenSource
from services.common.pki import EmbeddedPki, Identity
from services.planner.domain.workflow import build
from services.planner.store import RunQueries
from services.planner.workflows import Registry
from tests.integration.mesh_servers import mesh_servers, mtls_server_auth, seed_waiting_run
from tests.unit.planner_twins import RecordingPublisher

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
SUFFIX = uuid.uuid4().hex[:6]
TENANT, OTHER = f"acme{SUFFIX}", f"globex{SUFFIX}"
RUN = "run-matrix-1"

# Principals, by what they hold. Each row of the matrix picks the right one and the nearly-right one.
PEOPLE = {
    "viewer": ("vera", ("viewer",)), "operator": ("otto", ("operator",)), "privacy": ("pia", ("privacy-officer",)),
    "approver": ("alice", ("fraud-ops",)), "agent": ("sam", ("support-agent",)), "nobody": ("nemo", ()),
}
SERVICES = {"planner": ("policy-client",), "executor": ("memory-client",)}


@dataclass
class Mesh:
    pki: EmbeddedPki
    addresses: dict[str, str]
    publisher: RecordingPublisher
    runs: RunQueries

    def client(self, who: str | None, tenants: tuple[str, ...] = ()) -> ClientAuth:
        """Credentials of ``who`` (a key of PEOPLE or SERVICES) acting for ``tenants``; None: no token."""
        name = PEOPLE[who][0] if who in PEOPLE else who or "anon"
        cert_name = name if who in SERVICES else f"user-{name}"
        if not self.pki.cert_file(cert_name).exists():
            self.pki.issue_certificate(cert_name)
        token = ""
        if who is not None:
            kind, roles = ("service", SERVICES[who]) if who in SERVICES else ("user", PEOPLE[who][1])
            token = self.pki.mint(Identity(name, kind, tenants or (TENANT,), roles))
        return ClientAuth(mode="mtls", ca=self.pki.ca_file.read_bytes(), cert=self.pki.cert_file(cert_name).read_bytes(),
                          key=self.pki.key_file(cert_name).read_bytes(), token=TokenSource(token))

    def call(self, service: str, method: str, request: Any, client: ClientAuth) -> tuple[grpc.StatusCode, Any]:
        stub_type = {"memory": memory_pb2_grpc.MemoryServiceStub, "audit": audit_pb2_grpc.AuditServiceStub,
                     "policy": policy_pb2_grpc.PolicyServiceStub, "planner": workflow_pb2_grpc.WorkflowServiceStub}
        with client.secure_channel(self.addresses[service]) as chan:
            try:
                return grpc.StatusCode.OK, getattr(stub_type[service](chan), method)(request, timeout=10)
            except grpc.RpcError as exc:
                return exc.code(), None


@pytest.fixture(scope="module")
def mesh(infra: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    import redis

    pki = EmbeddedPki(tmp_path_factory.mktemp("pki")).ensure([], hosts=("localhost",))
    client = redis.Redis.from_url(infra.env()["AIOS_REDIS_URL"], decode_responses=True)
    runs = RunQueries(client)
    seed_waiting_run(client, TENANT, RUN)
    publisher = RecordingPublisher()
    registry = Registry([build({"name": "support-card-block", "version": 1,
                                "steps": [{"id": "gate", "tool": "bank.block_card"}]})])
    with mesh_servers(client, registry, publisher, runs, auth=lambda name: mtls_server_auth(pki, name)) as addresses:
        yield Mesh(pki, addresses, publisher, runs)


@dataclass(frozen=True)
class Row:
    service: str
    method: str
    request: Callable[[str], Any]  # tenant -> request
    right: str  # who may
    missing: str  # same tenant, lacks the role
    allowed: tuple[grpc.StatusCode, ...] = (grpc.StatusCode.OK,)
    tenant_scoped: bool = True
    check: Callable[[Mesh, Any], None] | None = None  # what only a wired call does (planner rows)


OK, NOT_FOUND = grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND


def _actor_was(expected: str) -> Callable[[Mesh, Any], None]:
    def check(mesh: Mesh, _response: Any) -> None:
        commands = mesh.publisher.decoded("commands")
        assert commands, "no command was published"
        assert commands[-1]["actor"] == expected and commands[-1]["tenant"] == TENANT, commands[-1]
    return check


def _assert_listed(response: Any) -> None:
    assert [r.run_id for r in response.runs] == [RUN]


def _decision(method: str) -> Callable[[str], Any]:
    return lambda t: workflow_pb2.DecisionRequest(tenant=t, run_id=RUN, step_id="gate", reason="checked")


ROWS = [
    # memory: reads need a viewer, writes an operator, erasure a privacy officer
    Row("memory", "Remember", lambda t: memory_pb2.RememberRequest(
        tenant=t, collection="kb", items=[memory_pb2.MemoryItem(id="a", text="hello")]), "operator", "viewer"),
    Row("memory", "Recall", lambda t: memory_pb2.RecallRequest(tenant=t, collection="kb", query="hi", k=1),
        "viewer", "agent"),
    Row("memory", "GetFact", lambda t: memory_pb2.GetFactRequest(tenant=t, key="city"), "viewer", "agent",
        (OK, NOT_FOUND)),
    Row("memory", "PutFact", lambda t: memory_pb2.PutFactRequest(tenant=t, key="city", value_json='"Oslo"',
                                                                  expected_version=-1), "operator", "viewer"),
    Row("memory", "ListEpisodes", lambda t: memory_pb2.ListEpisodesRequest(tenant=t), "viewer", "agent"),
    Row("memory", "Forget", lambda t: memory_pb2.ForgetRequest(tenant=t, subject="cust-1"), "privacy", "operator"),
    # the audit trail
    Row("audit", "Query", lambda t: audit_pb2.AuditQuery(tenant=t, limit=5), "viewer", "agent"),
    Row("audit", "Timeline", lambda t: audit_pb2.TimelineRequest(tenant=t, run_id=RUN), "viewer", "agent",
        (NOT_FOUND,)),
    # policy: decisions and reconciles are the planner's; budgets are also readable by viewers
    Row("policy", "Evaluate", lambda t: policy_pb2.EvaluateRequest(tenant=t, action="start_workflow", workflow="w"),
        "planner", "operator"),
    Row("policy", "EvaluateBatch", lambda t: policy_pb2.EvaluateBatchRequest(requests=[
        policy_pb2.EvaluateRequest(tenant=t, action="start_workflow", workflow="w")]), "planner", "executor"),
    Row("policy", "MaskInputs", lambda t: policy_pb2.MaskRequest(items=[
        policy_pb2.MaskItem(tenant=t, inputs_json='{"email": "a@b.co"}')]), "planner", "executor"),
    Row("policy", "GetBudget", lambda t: policy_pb2.GetBudgetRequest(tenant=t), "viewer", "agent"),
    Row("policy", "ReconcileBudget", lambda t: policy_pb2.ReconcileRequest(tenant=t, reservation_id="r-1"),
        "planner", "operator"),
    Row("policy", "ReconcileBudgetBatch", lambda t: policy_pb2.ReconcileBatchRequest(requests=[
        policy_pb2.ReconcileRequest(tenant=t, reservation_id="r-1")]), "planner", "operator"),
    # the planner's WorkflowService (the tenant of a right-role call is the principal's: the request leaves it
    # empty, and the command must name the principal as actor)
    Row("planner", "StartWorkflow", lambda t: workflow_pb2.StartWorkflowRequest(
        tenant=t, workflow="support-card-block", input_json="{}"), "operator", "viewer",
        check=_actor_was("user:otto")),
    Row("planner", "GetRun", lambda t: workflow_pb2.GetRunRequest(tenant=t, run_id=RUN), "viewer", "agent"),
    Row("planner", "ListRuns", lambda t: workflow_pb2.ListRunsRequest(tenant=t), "viewer", "agent",
        check=lambda _m, response: _assert_listed(response)),
    Row("planner", "Approve", _decision("Approve"), "approver", "operator", check=_actor_was("user:alice")),
    Row("planner", "Reject", _decision("Reject"), "approver", "operator", check=_actor_was("user:alice")),
    Row("planner", "Cancel", lambda t: workflow_pb2.CancelRequest(tenant=t, run_id=RUN, reason="r"), "operator",
        "viewer", check=_actor_was("user:otto")),
    Row("planner", "Signal", lambda t: workflow_pb2.SignalRequest(tenant=t, run_id=RUN, name="poke"), "operator",
        "viewer", check=_actor_was("user:otto")),
    Row("planner", "ListWorkflows", lambda t: workflow_pb2.ListWorkflowsRequest(), "viewer", "nobody",
        tenant_scoped=False),
]


def _cells() -> list[Any]:
    cells = []
    for row in ROWS:
        for case in ("no credential", "other tenant", "missing role", "right role"):
            if case == "other tenant" and not row.tenant_scoped:
                continue  # the workflow catalog belongs to no tenant
            cells.append(pytest.param(row, case, id=f"{row.service}.{row.method}-{case}"))
    return cells


@pytest.mark.parametrize(("row", "case"), _cells())
def test_method_x_credential(mesh: Mesh, row: Row, case: str) -> None:
    if case == "no credential":
        code, _ = mesh.call(row.service, row.method, row.request(TENANT), mesh.client(None))
        assert code == grpc.StatusCode.UNAUTHENTICATED
    elif case == "other tenant":
        code, _ = mesh.call(row.service, row.method, row.request(OTHER), mesh.client(row.right))
        assert code == grpc.StatusCode.PERMISSION_DENIED
    elif case == "missing role":
        code, _ = mesh.call(row.service, row.method, row.request(TENANT), mesh.client(row.missing))
        assert code == grpc.StatusCode.PERMISSION_DENIED
    else:
        # Tenant-scoped calls name no tenant: the principal's own applies (services name it: theirs is "*").
        tenant = TENANT if row.right in SERVICES else ""
        code, response = mesh.call(row.service, row.method, row.request(tenant), mesh.client(row.right))
        assert code in row.allowed, code
        if row.check is not None:
            row.check(mesh, response)


def test_the_matrix_covers_every_method_of_every_service() -> None:
    served = {(svc, m) for svc, module, name in (
        ("memory", memory_pb2, "MemoryService"), ("audit", audit_pb2, "AuditService"),
        ("policy", policy_pb2, "PolicyService"), ("planner", workflow_pb2, "WorkflowService"))
        for m in module.DESCRIPTOR.services_by_name[name].methods_by_name}
    assert {(r.service, r.method) for r in ROWS} == served
