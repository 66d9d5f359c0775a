"""The four mesh gRPC services (memory, audit, policy, planner) as real servicers on the session's Redis,
each on its own in-process server behind serve_grpc's interceptors, with the Cedar authorizer installed:
what the auth matrix and the gRPC fuzz tests both call. One place builds them, so the two test the same
servers and differ only in the credentials they serve with."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis

from aiosmesh.v1 import audit_pb2_grpc, memory_pb2_grpc, policy_pb2_grpc, workflow_pb2_grpc
from infra.stack import procs
from services.common import authz
from services.common.auth import ServerAuth
from services.common.grpc_server import serve_grpc
from services.common.pki import EmbeddedPki
from services.common.settings import GrpcAuthSettings
from services.memory.grpc_api import MemoryServicer
from services.memory.store import MemoryStore
from services.observability.adapters.audit_store import RedisAuditStore
from services.observability.adapters.grpc_api import AuditServicer
from services.planner.domain.state import RunState, StepState
from services.planner.grpc_api import WorkflowApi
from services.planner.store import RunQueries, _k
from services.planner.workflows import Registry
from services.policy.adapters.budget_store import RedisBudgetStore
from services.policy.adapters.grpc_api import PolicyServicer
from services.policy.adapters.policy_files import load_policy_dir
from services.policy.handlers import PolicyContext
from tests.unit.planner_twins import CountingPolicy, RecordingPublisher

REPO = Path(__file__).resolve().parents[2]
# Short name -> full gRPC service name, in the order the servers start.
SERVICES = {"memory": "aiosmesh.v1.MemoryService", "audit": "aiosmesh.v1.AuditService",
            "policy": "aiosmesh.v1.PolicyService", "planner": "aiosmesh.v1.WorkflowService"}


class _Audit:
    """The policy service's audit publisher, dropping every record (the tests read answers, not audit)."""

    def publish(self, key: str, record: dict[str, Any]) -> None:
        pass


def seed_waiting_run(client: redis.Redis, tenant: str, run_id: str) -> None:
    """A run of ``tenant`` parked at its approval gate (step "gate", role fraud-ops), listed in the
    tenant's runs, so GetRun, ListRuns and the decisions find something."""
    gate = StepState(id="gate", tool="bank.block_card", status="waiting_approval", approval_role="fraud-ops")
    run = RunState(run_id=run_id, tenant=tenant, workflow="support-card-block", version=1, input={},
                   status="waiting_approval", steps={"gate": gate})
    client.hset(_k(tenant, "run", run_id), "state", json.dumps(run.to_dict()))
    client.zadd(_k(tenant, "runs"), {run_id: 1})


def mtls_server_auth(pki: EmbeddedPki, name: str) -> ServerAuth:
    """Mutual TLS with a certificate for ``name`` issued now, and bearer tokens of ``pki``'s issuer."""
    pki.issue_certificate(name)
    return ServerAuth.from_settings(GrpcAuthSettings(
        grpc_auth="mtls", grpc_tls_ca_file=str(pki.ca_file), grpc_tls_cert_file=str(pki.cert_file(name)),
        grpc_tls_key_file=str(pki.key_file(name)), auth_jwks_file=str(pki.jwks_file), auth_issuer=pki.issuer,
        auth_audience=pki.audience))


@contextmanager
def mesh_servers(client: redis.Redis, registry: Registry, publisher: RecordingPublisher, runs: RunQueries,
                 auth: Callable[[str], ServerAuth] | None = None) -> Iterator[dict[str, str]]:
    """Serve the four services on free loopback ports; yields short name (SERVICES) -> address.

    ``auth`` gives each server its credentials by short name; None: from the AIOS_GRPC_* settings
    (the tests' default is AIOS_GRPC_AUTH=none). Servers stop, the authorizer is removed and
    ``client`` is closed on the way out."""
    servicers = {
        "memory": (memory_pb2_grpc.add_MemoryServiceServicer_to_server,
                   MemoryServicer(MemoryStore(client), lambda texts, _c: [[0.1] * 384 for _ in texts],
                                  publish_audit=lambda *_: None)),
        "audit": (audit_pb2_grpc.add_AuditServiceServicer_to_server, AuditServicer(RedisAuditStore(client))),
        "policy": (policy_pb2_grpc.add_PolicyServiceServicer_to_server, PolicyServicer(PolicyContext(
            policy=load_policy_dir(REPO / "policies"), budgets=RedisBudgetStore(client),
            audit=_Audit()))),  # type: ignore[arg-type]
        "planner": (workflow_pb2_grpc.add_WorkflowServiceServicer_to_server,
                    WorkflowApi(store=runs, registry=registry, producer=publisher, policy=CountingPolicy(),
                                default_tenant="demo")),
    }
    authz.install(authz.Authorizer(REPO / "policies" / "authz.cedar", REPO / "policies" / "authz.cedarschema"))
    servers, addresses = [], {}
    try:
        for name, (add, servicer) in servicers.items():
            addresses[name] = f"127.0.0.1:{procs.free_port()}"
            server_auth = auth(name) if auth is not None else None
            servers.append(serve_grpc(addresses[name], [(add, servicer, SERVICES[name])], auth=server_auth)[0])
        yield addresses
    finally:
        for server in servers:
            server.stop(0)
        authz.install(None)
        client.close()
