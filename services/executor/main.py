"""The executor's composition root: settings, and ``bootstrap`` that builds every client."""

from __future__ import annotations

import importlib
import os
from typing import Any

from pydantic import Field, SecretStr, model_validator

from services.common.pii_tokens import TokenVault
from services.common.runtime import ServiceRuntime
from services.common.settings import MeshSettings, load_settings
from services.common.uow import RedisUnitOfWork
from services.executor import metrics
from services.executor.adapters.claims import RedisClaimStore
from services.executor.adapters.connectors import HttpConnectors
from services.executor.adapters.generator import (
    ExtractiveGenerator,
    OpenAICompatibleGenerator,
    ReplyGenerator,
)
from services.executor.adapters.leases import LeaseKeeper, RedisLeaseStore
from services.executor.adapters.memory import MemoryTools, reply_tools
from services.executor.adapters.rate_limits import RateLimit, RateLimiter
from services.executor.adapters.runner import ToolRunner
from services.executor.adapters.toolbox import Toolbox
from services.executor.handlers import ExecutorConfig, StepHandler

__all__ = ["ExecutorSettings", "bootstrap", "main", "make_generator"]


class ExecutorSettings(MeshSettings):
    executor_metrics_port: int = Field(9102, ge=0, le=65535)
    executor_workers: int = Field(16, ge=1, le=256, description="steps run concurrently per replica; "
                                  "twice as many tool workers run their calls")
    executor_batch_size: int = Field(32, ge=1, le=1000)
    executor_generator_url: str = Field("", description="OpenAI-compatible endpoint; empty = offline extractive")
    executor_generator_model: str = Field("", description="model name for the generator endpoint")
    executor_generator_api_key: SecretStr = Field(
        SecretStr(""), description="bearer token for the generator endpoint (from a Secret); empty sends none")
    executor_plugins: str = Field("", description="comma list of Python modules that register extra tools")
    executor_record_ttl_s: int = Field(
        7 * 24 * 3600, ge=60,
        description="retention: idempotency records, attempt fences and claim-checked outputs expire this long "
        "after their last write; a request redelivered later than this runs its tool again (third parties "
        "still deduplicate by the idempotency key)")
    executor_lease_ttl_s: float = Field(
        10.0, ge=1.0, le=600.0,
        description="a running call's lease outlives a crashed executor by this much (renewed every third of it "
        "while the call runs); a retry of that step waits at most this long after a crash")
    executor_claim_threshold_bytes: int = Field(
        256 * 1024, ge=1024,
        description="a tool output whose JSON is bigger is stored in Redis by reference (claim check)")
    executor_max_response_bytes: int = Field(
        1024 * 1024, ge=1024,
        description="connector response bodies are read up to this size; a bigger one fails the step "
        "(per connector: max_response_bytes in connectors.yaml)")
    executor_tenant_rate_per_s: float = Field(
        0.0, ge=0, description="tool calls per second each tenant may make across every executor replica "
        "(shared through Redis); 0 = no tenant limit")
    executor_tenant_burst: int = Field(10, ge=1, le=100000, description="calls a tenant may make at once "
                                       "before its rate limit spaces them")
    executor_tenant_max_wait_ms: int = Field(
        1000, ge=0, le=600000, description="how long a step over its tenant's rate limit waits for a slot before "
        "it fails as RateLimited and is retried later (connector tools follow their connector's max_wait_ms)")
    executor_tenant_rates: dict[str, float] = Field(
        default_factory=dict, description='per-tenant calls per second overriding the default, JSON: {"acme": 50}')
    sandbox_url: str = Field("http://127.0.0.1:18100", description="sandbox third-party API (demo, tests)")

    @model_validator(mode="after")
    def _tenant_rates_positive(self) -> ExecutorSettings:
        bad = {t: r for t, r in self.executor_tenant_rates.items() if not r > 0}
        if bad:
            raise ValueError(f"AIOS_EXECUTOR_TENANT_RATES: every rate must be > 0 calls/s, got {bad} "
                             "(drop a tenant to give it the default)")
        return self

    def rate_limiter_args(self) -> dict[str, Any]:
        """The tenant limits as RateLimiter takes them."""
        def limit(rate: float, setting: str) -> RateLimit:
            return RateLimit(rate, self.executor_tenant_burst, self.executor_tenant_max_wait_ms, setting=setting)

        default = limit(self.executor_tenant_rate_per_s, "AIOS_EXECUTOR_TENANT_RATE_PER_S") \
            if self.executor_tenant_rate_per_s else None
        return {"tenant_default": default, "tenants": {t: limit(r, "AIOS_EXECUTOR_TENANT_RATES")
                                                       for t, r in self.executor_tenant_rates.items()}}

    @model_validator(mode="after")
    def _claims_fit_in_a_record(self) -> ExecutorSettings:
        if self.executor_claim_threshold_bytes > self.max_record_bytes // 2:
            raise ValueError(f"executor_claim_threshold_bytes ({self.executor_claim_threshold_bytes}) must be at "
                             f"most half of max_record_bytes ({self.max_record_bytes}): an output just under the "
                             "threshold must still fit in a step result record")
        return self


def make_generator(settings: ExecutorSettings) -> ReplyGenerator:
    if settings.executor_generator_url:
        return OpenAICompatibleGenerator(settings.executor_generator_url, settings.executor_generator_model or "default",
                                         settings.executor_generator_api_key.get_secret_value())
    return ExtractiveGenerator()


def bootstrap(settings: ExecutorSettings) -> ServiceRuntime:
    """Build the executor: toolbox, tool runner, stores, handler, consumer."""
    os.environ.setdefault("AIOS_SANDBOX_URL", settings.sandbox_url)
    for module in filter(None, (m.strip() for m in settings.executor_plugins.split(","))):
        importlib.import_module(module)  # registers its @tool functions
    vault = TokenVault.from_file(settings.pii_key_file) if settings.pii_key_file else None  # before connecting
    rt = ServiceRuntime("executor", settings, metrics_port=settings.executor_metrics_port)
    rt.ensure_topics()
    connectors = HttpConnectors(rt.redis, max_response_bytes=settings.executor_max_response_bytes)
    metrics.watch_circuits(connectors.breakers)  # aios_circuit_breaker_state, read at scrape time
    limiter = RateLimiter(rt.redis, connectors=connectors.rate_limits, **settings.rate_limiter_args())
    toolbox = Toolbox({**MemoryTools(settings.memory_addr).tools(), **reply_tools(make_generator(settings))},
                      connectors, limiter=limiter, amounts=connectors.amounts,
                      vault=vault)
    config = ExecutorConfig(name=f"executor-{os.getpid()}", record_ttl_s=settings.executor_record_ttl_s,
                            lease_ttl_ms=int(settings.executor_lease_ttl_s * 1000),
                            claim_threshold_bytes=settings.executor_claim_threshold_bytes)
    leases = RedisLeaseStore(rt.redis)
    handler = StepHandler(uow=RedisUnitOfWork(rt.redis), leases=leases, claims=RedisClaimStore(rt.redis),
                          producer=rt.producer, runner=ToolRunner(toolbox, workers=settings.executor_workers * 2),
                          config=config, workers=settings.executor_workers,
                          keeper=LeaseKeeper(leases, config.lease_ttl_ms))
    rt.serve(settings.executor_addr, [])  # health and reflection only
    rt.consume("executor", ["step_requests"], handler.handle, batch_size=settings.executor_batch_size)
    rt.on_stop(lambda: handler.close(grace_s=settings.executor_lease_ttl_s))
    rt.on_stop(connectors.close)
    return rt


def main() -> None:
    bootstrap(load_settings(ExecutorSettings)).run_until_stopped()
