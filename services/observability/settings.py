"""Observability settings: AIOS_OBSERVABILITY_* on top of the shared mesh settings."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from services.common.settings import MeshSettings
from services.observability.domain.drift import DriftConfig


class ObservabilitySettings(MeshSettings):
    observability_metrics_port: int = Field(9105, ge=0, le=65535, description="Prometheus /metrics port (0 = off)")
    observability_audit_retention_days: float = Field(90, gt=0, le=3650,
                                                      description="how long audit entries are kept (days); older "
                                                      "ones are trimmed by time")
    observability_retention: str = Field("", description="replaced by AIOS_OBSERVABILITY_AUDIT_RETENTION_DAYS; "
                                         "setting it stops the service")
    observability_run_meta_ttl_s: int = Field(7 * 86400, ge=60,
                                              description="how long a run's workflow/tool facts are kept for "
                                              "usage and step metrics")
    observability_drift_window_records: int = Field(500, ge=1, description="routed messages per intent drift "
                                                    "window (a multiple of the step)")
    observability_drift_step_records: int = Field(100, ge=1, description="messages the drift window slides by; a "
                                                  "score each step")
    observability_drift_baseline_windows: int = Field(4, ge=1, description="windows of a stream's first messages "
                                                      "that form its drift baseline")

    @model_validator(mode="after")
    def _drift_windows(self) -> ObservabilitySettings:
        if self.observability_drift_window_records % self.observability_drift_step_records:
            raise ValueError(f"AIOS_OBSERVABILITY_DRIFT_WINDOW_RECORDS ({self.observability_drift_window_records}) "
                             "must be a multiple of AIOS_OBSERVABILITY_DRIFT_STEP_RECORDS "
                             f"({self.observability_drift_step_records})")
        return self

    def drift_config(self) -> DriftConfig:
        return DriftConfig(window_records=self.observability_drift_window_records,
                           step_records=self.observability_drift_step_records,
                           baseline_windows=self.observability_drift_baseline_windows)

    @field_validator("observability_retention")
    @classmethod
    def _retention_moved(cls, value: str) -> str:
        """The old count cap (entries per tenant) is gone; refusing it beats silently ignoring it."""
        if value:
            raise ValueError("the audit trail is kept by time now: unset it and set "
                             "AIOS_OBSERVABILITY_AUDIT_RETENTION_DAYS (default 90)")
        return value
