"""Policy settings: AIOS_POLICY_* on top of the shared mesh settings."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from services.common.catalog import REPO_ROOT
from services.common.settings import MeshSettings


class PolicySettings(MeshSettings):
    policy_metrics_port: int = Field(9104, ge=0, le=65535, description="Prometheus /metrics port (0 = off)")
    policy_dir: Path = Field(REPO_ROOT / "policies", description="directory of policy files (*.yaml)")
    policy_tools_file: Path = Field(
        REPO_ROOT / "services" / "executor" / "connectors.yaml",
        description="the tool declarations whose `amount: {field, unit}` say which input is a tool's amount "
                    "(the executor's connectors file: both sides read the same declaration)")
    policy_reservation_ttl_s: int = Field(
        3600, ge=1, le=90 * 86400,
        description="a budget hold nobody settles (a dead-lettered run, a lost commit) is released this long after "
                    "it was made; a step that settles later is still charged its actual cost")
    policy_audit_flush_ms: int = Field(100, ge=1, le=10000,
                                       description="how often queued audit records are flushed to the broker")
