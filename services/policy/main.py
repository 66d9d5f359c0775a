"""Composition root of the policy service: ``python -m services.policy``."""

from __future__ import annotations

import logging

from aiosmesh.v1 import policy_pb2_grpc
from services.common.amounts import load_amount_fields
from services.common.errors import ConfigError
from services.common.pii_tokens import TokenVault
from services.common.runtime import ServiceRuntime
from services.common.settings import load_settings
from services.policy import metrics
from services.policy.adapters.audit import AuditPublisher
from services.policy.adapters.budget_store import RedisBudgetStore
from services.policy.adapters.grpc_api import SERVICE_NAME, PolicyServicer
from services.policy.adapters.policy_files import load_policy_dir
from services.policy.handlers import PolicyContext
from services.policy.settings import PolicySettings

log = logging.getLogger(__name__)


def bootstrap(settings: PolicySettings) -> ServiceRuntime:
    """Load the policies (a bad file stops us before anything connects), then serve."""
    policy = load_policy_dir(settings.policy_dir)
    amount_fields = load_amount_fields(settings.policy_tools_file)
    vault = TokenVault.from_file(settings.pii_key_file) if settings.pii_key_file else None
    rt = ServiceRuntime("policy", settings, metrics_port=settings.policy_metrics_port)
    log.info("loaded %d policy file(s), %d rule(s), budgets for %s", len(policy.files), len(policy.rules),
             sorted(policy.budgets))
    rt.ensure_topics()
    audit = AuditPublisher(rt.producer, flush_interval_s=settings.policy_audit_flush_ms / 1000).start()
    if vault is None and policy.pii.tokenize_fields:
        log.warning("no AIOS_PII_KEY_FILE: pii.tokenize_fields %s are masked, so connectors that need them "
                    "(connectors.yaml detokenize) will fail", sorted(policy.pii.tokenize_fields))
    ctx = PolicyContext(policy=policy, budgets=_budget_store(rt, settings), audit=audit, amount_fields=amount_fields,
                        vault=vault)
    rt.serve(settings.policy_addr, [(policy_pb2_grpc.add_PolicyServiceServicer_to_server, PolicyServicer(ctx),
                                     SERVICE_NAME)])
    rt.on_stop(audit.stop)  # after the gRPC server stopped: no decision is made after the last flush
    return rt


def _budget_store(rt: ServiceRuntime, settings: PolicySettings) -> RedisBudgetStore:
    store = RedisBudgetStore(rt.redis, reservation_ttl_s=settings.policy_reservation_ttl_s)
    store.on_expired = metrics.holds_expired
    return store


def main() -> None:
    settings = load_settings(PolicySettings)
    try:
        rt = bootstrap(settings)
    except ConfigError as exc:
        raise SystemExit(f"policy: {exc}") from None
    rt.run_until_stopped()
