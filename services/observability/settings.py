"""Observability settings: AIOS_OBSERVABILITY_* on top of the shared mesh settings."""

from __future__ import annotations

from pydantic import Field

from services.common.settings import MeshSettings


class ObservabilitySettings(MeshSettings):
    observability_metrics_port: int = Field(9105, ge=0, le=65535, description="Prometheus /metrics port (0 = off)")
    observability_retention: int = Field(100_000, ge=1,
                                         description="audit entries kept per tenant; the oldest are dropped")
    observability_run_meta_ttl_s: int = Field(7 * 86400, ge=60,
                                              description="how long a run's workflow/tool facts are kept for "
                                              "usage and step metrics")
