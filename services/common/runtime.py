"""The composition root every service builds on: one ``ServiceRuntime`` owns
the clients (producer, consumers, Redis, gRPC server) and stops them in order
on SIGTERM/SIGINT. Nothing connects at import time.

Exit codes: 0 after SIGTERM/SIGINT; ``EXIT_FAILED`` (70, EX_SOFTWARE) when a
consumer loop died or the Kafka producer hit a fatal error. A process that can
no longer consume or produce must not linger looking alive: exiting non-zero
lets its supervisor (the embedded stack's, or Kubernetes) restart it, and the
next owner of its partitions redelivers whatever it had not acknowledged.

Hot standby (``AIOS_STANDBY_LEASE_MS`` > 0): one replica of each consumer group is a
member at a time, the one holding the group's ``StandbyLease`` in Redis; the other
replicas serve gRPC and wait outside the group, and one of them joins as soon as the
lease lapses (a crash) or is released (a graceful stop). See docs/DECISIONS.md."""

from __future__ import annotations

import logging
import os
import signal
import socket
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


class StandbyLease:
    """Which replica of a consumer group is its member: the holder of a Redis key that expires
    ``lease_ms`` after its last renewal (a ``MembershipGate`` for ``ConsumerLoop``).

    Every replica runs one. The holder renews the key every fifth of ``lease_ms``; a standby
    looks every tenth and takes the key once it found it missing on two looks at least a
    renewal period apart, with no Redis error between them. So after a kill -9 the first
    standby takes over about ``lease_ms`` plus a renewal period later, while a Redis that
    stalled past the lease (as it does on a loaded machine) gives a live holder, whose queued
    or next renewal takes the key back, the first go. ``close()`` (a graceful stop, after the
    loop left the group) deletes the key, so that a standby takes over at once.

    Only membership hangs on the lease, never correctness: two replicas that both believe they
    hold it are two members of one group, which Kafka keeps apart, and a member that finds the
    key taken by another exits without leaving the group (ConsumerLoop). While Redis cannot be
    reached every replica keeps what it has."""

    # 1: we hold the key (renewed, or taken when missing and ARGV[3] allows it); 0: another
    # replica holds it; -1: nobody holds it and we did not take it.
    _TAKE = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if holder then return 0 end
if ARGV[3] == '1' then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
return -1"""
    _GIVE_UP = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0"""

    def __init__(self, client: redis.Redis, group: str, lease_ms: int, *, name: str = "") -> None:
        self.key = self.key_for(group)
        self.group, self.lease_ms = group, lease_ms
        self.renew_s = lease_ms / 5000
        # The holder, as the key's value: "<name>/<pid>/<random>" (name: the instance id or host).
        self.owner = f"{name or socket.gethostname()}/{os.getpid()}/{os.urandom(4).hex()}"
        self._take = client.register_script(self._TAKE)
        self._give_up = client.register_script(self._GIVE_UP)
        self._held = False
        self._missing_since: float | None = None  # monotonic time of the first look that found no holder
        self._warned = 0.0
        self._stop = threading.Event()
        self._renew()
        self._thread = threading.Thread(target=self._run, name=f"standby-lease-{group}", daemon=True)
        self._thread.start()

    @staticmethod
    def key_for(group: str) -> str:
        return f"aios:standby:{{{group}}}"

    @staticmethod
    def pid_of(holder: str) -> int:
        """The process id in a holder value (0 if it is not one)."""
        parts = holder.split("/")
        return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else 0

    def active(self) -> bool:
        return self._held

    def _renew(self) -> None:
        now = time.monotonic()
        # The holder takes a lapsed key back at once; a standby only on a second look.
        may_take = self._held or (self._missing_since is not None and now - self._missing_since >= self.renew_s)
        try:
            outcome = int(self._take(keys=[self.key], args=[self.owner, self.lease_ms, int(may_take)]))
        except redis.RedisError as exc:
            self._missing_since = None  # looks before and after an outage are not a sequence
            if now - self._warned > 10:
                self._warned = now
                log.warning("standby lease of %s not renewed (%s); keeping %s", self.group, exc,
                            "membership" if self._held else "standing by")
            return
        if outcome >= 0:
            self._missing_since = None
        elif self._missing_since is None:
            self._missing_since = now
        held = outcome == 1
        if held != self._held:
            log.info("standby lease of %s %s", self.group, "taken" if held else "held by another replica")
        self._held = held

    def _run(self) -> None:
        # A standby looks twice as often as the holder renews: each look it misses after the
        # lease lapsed is time the group has no member.
        while not self._stop.wait(self.renew_s if self._held else self.renew_s / 2):
            self._renew()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        if self._held:
            try:
                self._give_up(keys=[self.key], args=[self.owner])
            except redis.RedisError as exc:  # it lapses by itself within lease_ms
                log.warning("standby lease of %s not released: %s", self.group, exc)
        self._held = False


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
        self._lease_redis: redis.Redis | None = None
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
                            heartbeat_interval_ms=self.settings.heartbeat_interval_ms,
                            gate=self.standby_lease(self.settings.topic_prefix + group),
                            client_config=self.settings.kafka_client_config(), **kwargs)
        self.consumers.append(loop.start())
        return loop

    def standby_lease(self, group: str) -> StandbyLease | None:
        """The group's hot-standby lease when AIOS_STANDBY_LEASE_MS > 0 (None: every replica is a member).
        Its own Redis client, whose timeouts fit in the lease: a renewal stuck longer is worthless."""
        lease_ms = self.settings.standby_lease_ms
        if not lease_ms:
            return None
        if self._lease_redis is None:
            timeout_s = max(0.2, lease_ms / 2000)
            self._lease_redis = redis.Redis.from_url(self.settings.redis_url, decode_responses=True,
                                                     socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        return StandbyLease(self._lease_redis, group, lease_ms, name=self.settings.instance_id)

    def instance_id(self, group: str) -> str:
        """The consumer's static member id (group.instance.id) in ``group``: ``<group>-<AIOS_INSTANCE_ID>``,
        e.g. ``planner-aios-aios-mesh-planner-0`` for the chart's StatefulSet pod ``aios-aios-mesh-planner-0``.
        Empty (dynamic membership) without AIOS_INSTANCE_ID, as for a Deployment whose pod names change on
        every rollout. The group is in the id because one process may consume in several groups."""
        return f"{group}-{self.settings.instance_id}" if self.settings.instance_id else ""

    def serve(self, address: str, registrations: Sequence[Registration]) -> grpc.Server:
        """Start a gRPC server for the service clients dial at ``address``; it binds
        ``AIOS_GRPC_LISTEN_ADDR`` when set (0.0.0.0:50051 in a pod), else ``address`` itself."""
        server, health = serve_grpc(self.settings.listen_addr(address), registrations, ready=False,
                                    limits=self.settings)
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
        # Ready (gRPC health SERVING) once every consumer has joined its group or stands by
        # (hot standby), or after 20 s (a replica may legitimately own no partition).
        deadline = time.monotonic() + 20
        while not self._stop.is_set() and time.monotonic() < deadline and not self.failure() and \
                not all(c.ready for c in self.consumers):
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
