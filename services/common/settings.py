"""Typed, validated settings. Every service subclasses ``MeshSettings``; all
variables share the ``AIOS_`` prefix and service-specific fields carry the
service name (``AIOS_PLANNER_GRPC_PORT``). A bad value stops the process with a
message that names the variable."""

from __future__ import annotations

import sys
from typing import TypeVar

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict


class MeshSettings(BaseSettings):
    """Settings every service needs: where the broker, Redis and inference live."""

    model_config = SettingsConfigDict(env_prefix="AIOS_", extra="ignore", frozen=True)

    kafka_bootstrap: str = Field("127.0.0.1:19092", description="Kafka bootstrap servers (host:port,...)")
    topic_prefix: str = Field("aios.", description="Prefix of every topic name; one deployment, one prefix")
    fetch_wait_ms: int = Field(
        10, ge=1, le=5000,
        description="consumer fetch.wait.max.ms; 10 on the embedded broker (it does not wake fetches), "
        "500 on real Kafka",
    )
    session_timeout_ms: int = Field(6000, ge=1000, le=300000, description="consumer group session timeout")
    redis_url: str = Field("redis://127.0.0.1:16379/0", description="Redis 8 URL")
    inference_url: str = Field("http://127.0.0.1:18000", description="Ray Serve inference router")
    planner_addr: str = Field("127.0.0.1:50051", description="planner gRPC (WorkflowService)")
    executor_addr: str = Field("127.0.0.1:50052", description="executor gRPC (health only)")
    memory_addr: str = Field("127.0.0.1:50053", description="memory gRPC (MemoryService)")
    policy_addr: str = Field("127.0.0.1:50054", description="policy gRPC (PolicyService)")
    observability_addr: str = Field("127.0.0.1:50055", description="observability gRPC (AuditService)")
    log_level: str = Field("INFO", pattern="^(DEBUG|INFO|WARNING|ERROR)$")
    log_format: str = Field("json", pattern="^(json|text)$")
    otlp_endpoint: str = Field("", description="OTLP/gRPC traces endpoint; empty keeps traces in-process")
    instance_id: str = Field("", description="stable replica name (pod name); enables static group membership "
                             "so a restarted replica takes its partitions back without a rebalance")
    assignor: str = Field("range", pattern="^(range|roundrobin|cooperative-sticky)$",
                          description="consumer partition assignment strategy")
    max_record_bytes: int = Field(1_000_000, ge=1024, description="larger records go to the dead letters")

    def topic(self, role_name: str) -> str:
        return self.topic_prefix + role_name


S = TypeVar("S", bound=BaseSettings)


def load_settings(cls: type[S]) -> S:
    """Build settings from the environment or exit(2) naming what is wrong."""
    try:
        return cls()
    except ValidationError as exc:
        prefix = str(cls.model_config.get("env_prefix", ""))
        lines = [f"invalid settings for {cls.__name__}:"]
        for err in exc.errors():
            name = prefix + "_".join(str(p) for p in err["loc"]).upper()
            lines.append(f"  {name}={err.get('input')!r}: {err['msg']}")
        lines.append("fix the environment variable(s) above and start again")
        print("\n".join(lines), file=sys.stderr)
        raise SystemExit(2) from None
