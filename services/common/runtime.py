"""The composition root every service builds on: one ``ServiceRuntime`` owns
the clients (producer, consumers, Redis, gRPC server) and stops them in order
on SIGTERM/SIGINT. Nothing connects at import time.

Exit codes: 0 after SIGTERM/SIGINT; ``EXIT_FAILED`` (70, EX_SOFTWARE) when a
consumer loop died or the Kafka producer hit a fatal error. A process that can
no longer consume or produce must not linger looking alive: exiting non-zero
lets its supervisor (the embedded stack's, or Kubernetes) restart it, and the
next owner of its partitions redelivers whatever it had not acknowledged."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Sequence
from typing import Any

import grpc
import redis

from services.common import metrics
from services.common.catalog import Catalog
from services.common.codec import AvroCodec
from services.common.grpc_server import Registration, serve_grpc, set_serving
from services.common.kafka import ConsumerLoop, Handler, MeshProducer
from services.common.logs import configure_logging
from services.common.settings import MeshSettings
from services.common.tracing import configure_tracing

log = logging.getLogger(__name__)
EXIT_FAILED = 70  # EX_SOFTWARE: the service stopped itself because it could not go on


class ServiceRuntime:
    def __init__(self, service: str, settings: MeshSettings, *, metrics_port: int = 0) -> None:
        self.service = service
        self.settings = settings
        configure_logging(service, settings.log_level, settings.log_format)
        configure_tracing(service, settings.otlp_endpoint)
        self.catalog = Catalog(settings.topic_prefix)
        self.codec = AvroCodec(self.catalog.schemas)
        self._producer: MeshProducer | None = None
        self._redis: redis.Redis | None = None
        self.consumers: list[ConsumerLoop] = []
        self.servers: list[grpc.Server] = []
        self._health: list[tuple[Any, list[str]]] = []
        self._stop = threading.Event()
        self._on_stop: list[Any] = []
        metrics.start_metrics_server(metrics_port, host=settings.metrics_host)
        metrics.UP.labels(service).set(1)

    @property
    def producer(self) -> MeshProducer:
        if self._producer is None:
            self._producer = MeshProducer(self.settings.kafka_bootstrap, self.catalog, self.codec,
                                          client_config=self.settings.kafka_client_config())
        return self._producer

    @property
    def redis(self) -> redis.Redis:
        if self._redis is None:
            self._redis = redis.Redis.from_url(self.settings.redis_url, decode_responses=True,
                                               socket_timeout=5, socket_connect_timeout=5,
                                               health_check_interval=30)
        return self._redis

    def ensure_topics(self) -> None:
        """Create the catalog's missing topics, unless a topics job owns them
        (AIOS_CREATE_TOPICS_AT_START=false, as the Helm chart sets)."""
        if not self.settings.create_topics_at_start:
            return
        self.catalog.ensure_topics(self.settings)

    def consume(self, group: str, roles: Sequence[str], handler: Handler, **kwargs: Any) -> ConsumerLoop:
        loop = ConsumerLoop(service=self.service, group=self.settings.topic_prefix + group, roles=roles,
                            handler=handler, bootstrap=self.settings.kafka_bootstrap, catalog=self.catalog,
                            codec=self.codec, producer=self.producer,
                            fetch_wait_ms=kwargs.pop("fetch_wait_ms", self.settings.fetch_wait_ms),
                            session_timeout_ms=self.settings.session_timeout_ms,
                            max_record_bytes=self.settings.max_record_bytes, assignor=self.settings.assignor,
                            instance_id=self.instance_id(group),
                            client_config=self.settings.kafka_client_config(), **kwargs)
        self.consumers.append(loop.start())
        return loop

    def instance_id(self, group: str) -> str:
        """The consumer's static member id (group.instance.id) in ``group``: ``<group>-<AIOS_INSTANCE_ID>``,
        e.g. ``planner-aios-aios-mesh-planner-0`` for the chart's StatefulSet pod ``aios-aios-mesh-planner-0``.
        Empty (dynamic membership) without AIOS_INSTANCE_ID, as for a Deployment whose pod names change on
        every rollout. The group is in the id because one process may consume in several groups."""
        return f"{group}-{self.settings.instance_id}" if self.settings.instance_id else ""

    def serve(self, address: str, registrations: Sequence[Registration]) -> grpc.Server:
        """Start a gRPC server for the service clients dial at ``address``; it binds
        ``AIOS_GRPC_LISTEN_ADDR`` when set (0.0.0.0:50051 in a pod), else ``address`` itself."""
        server, health = serve_grpc(self.settings.listen_addr(address), registrations, ready=False)
        self.servers.append(server)
        self._health.append((health, [name for _a, _s, name in registrations]))
        return server

    def _mark_ready(self, ready: bool) -> None:
        for health, names in self._health:
            set_serving(health, names, ready)

    def on_stop(self, callback: Any) -> None:
        """Run ``callback`` when stopping, after the consumers drained (background threads the service started)."""
        self._on_stop.append(callback)

    def request_stop(self, *_: Any) -> None:
        self._stop.set()

    def run_until_stopped(self) -> None:
        """Block until SIGTERM/SIGINT, a consumer loop dies or the producer fails fatally, then stop
        gracefully; in the last two cases exit with ``EXIT_FAILED`` (raises SystemExit)."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        # Ready (gRPC health SERVING) once every consumer has joined its group, or
        # after 20 s (a replica may legitimately own no partition).
        deadline = time.monotonic() + 20
        while not self._stop.is_set() and time.monotonic() < deadline and not self.failure() and \
                not all(c.assigned.is_set() for c in self.consumers):
            self._stop.wait(0.05)
        failure = self.failure()
        if not failure:
            self._mark_ready(True)
            log.info("%s ready", self.service)
        while not failure and not self._stop.wait(0.5):
            failure = self.failure()
        if failure:
            log.error("%s; %s stops and exits with %d so that it is restarted", failure, self.service,
                      EXIT_FAILED)
        self.shutdown()
        if failure:
            raise SystemExit(EXIT_FAILED)

    def failure(self) -> str:
        """Why this process cannot go on (empty while it can)."""
        if self._producer is not None and self._producer.fatal:
            return f"the Kafka producer hit a fatal error ({self._producer.fatal})"
        dead = [c.group for c in self.consumers if not c.running]
        return f"the consumer loop of {', '.join(dead)} died" if dead else ""

    def shutdown(self) -> None:
        log.info("%s stopping", self.service)
        self._mark_ready(False)
        for server in self.servers:
            server.stop(grace=2).wait(3)
        for consumer in self.consumers:
            consumer.stop()  # finishes in-flight work and commits
        for callback in self._on_stop:
            callback()
        if self._producer is not None:
            self._producer.close()
        metrics.UP.labels(self.service).set(0)
