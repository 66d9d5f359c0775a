"""The planner's own metrics (the shared ones live in services/common/metrics.py)."""

from __future__ import annotations

from prometheus_client import Counter

ADMISSION_WAITS = Counter("aios_admission_waits_total",
                          "Ingress events deferred because their tenant or workflow had the most runs in flight "
                          "it may; the partition is paused and read again later")
