"""Composition root of the observability service: ``python -m services.observability``."""

from __future__ import annotations

import logging
import threading
from functools import partial

from aiosmesh.v1 import audit_pb2_grpc
from services.common.errors import TransientError
from services.common.runtime import ServiceRuntime
from services.common.settings import load_settings
from services.common.uow import marker_ttl_s
from services.observability import metrics
from services.observability.adapters.audit_store import RedisAuditStore
from services.observability.adapters.drift_store import RedisDriftStore
from services.observability.adapters.grpc_api import SERVICE_NAME, AuditServicer
from services.observability.handlers import ROLES, ObservabilityContext, handle_records
from services.observability.settings import ObservabilitySettings

log = logging.getLogger(__name__)
DRIFT_REFRESH_S = 15.0  # a Prometheus scrape interval: how long a replica may show a score another replaced


def _refresh_drift(drift: RedisDriftStore, stop: threading.Event) -> None:
    """Every replica exports the drift scores all replicas share, not the last one it computed."""
    while not stop.wait(DRIFT_REFRESH_S):
        try:
            metrics.sync_drift(drift.scores())
        except TransientError as exc:
            log.warning("drift scores not refreshed: %s", exc)
        except Exception:  # never let the thread die: the gauges would go stale again
            log.exception("drift scores not refreshed")


def bootstrap(settings: ObservabilitySettings) -> ServiceRuntime:
    """Serve AuditService and consume the four topics with one consumer (group "observability")."""
    rt = ServiceRuntime("observability", settings, metrics_port=settings.observability_metrics_port)
    rt.ensure_topics()
    # A marker must outlive any redelivery: the longest retention of the consumed topics (30 days).
    store = RedisAuditStore(rt.redis, retention_days=settings.observability_audit_retention_days,
                            run_meta_ttl_s=settings.observability_run_meta_ttl_s,
                            marker_ttl_s=marker_ttl_s(*(rt.catalog.spec(role).retention_ms for role in ROLES)))
    # The DLQ depth is a level, not a rate: restore it so a restart does not reset the gauge to zero.
    metrics.set_dlq_depths(store.dlq_depths())
    # Drift streams live in Redis: a restart continues them, and their last scores are exported at once.
    drift = RedisDriftStore(rt.redis, settings.drift_config())
    metrics.sync_drift(drift.scores())
    stop_refresh = threading.Event()
    threading.Thread(target=_refresh_drift, args=(drift, stop_refresh), name="drift-refresh", daemon=True).start()
    rt.on_stop(stop_refresh.set)
    rt.serve(settings.observability_addr,
             [(audit_pb2_grpc.add_AuditServiceServicer_to_server, AuditServicer(store), SERVICE_NAME)])
    ctx = ObservabilityContext(store=store, catalog=rt.catalog, drift=drift)
    rt.consume("observability", ROLES, partial(handle_records, ctx),
               fetch_wait_ms=settings.background_fetch_wait_ms)
    return rt


def main() -> None:
    bootstrap(load_settings(ObservabilitySettings)).run_until_stopped()
