"""Where the mesh is and how to talk to it: settings, gRPC stubs, health checks,
and the one place transport errors become ``CliError``s with a hint."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import grpc
from pydantic import ValidationError

from aiosmesh.v1 import audit_pb2_grpc, memory_pb2_grpc, policy_pb2_grpc, workflow_pb2, workflow_pb2_grpc
from services.common.auth import ClientAuth, client_auth_for, registered_client
from services.common.errors import ConfigError
from services.common.settings import MeshSettings, load_settings

RPC_TIMEOUT_S = 10.0
HEALTH_TIMEOUT_S = 2.0
FINAL_STATES = frozenset({"completed", "failed", "cancelled", "compensation_failed"})
SERVICES = ("planner", "executor", "memory", "policy", "observability")
_STUBS: dict[str, Callable[[grpc.Channel], Any]] = {
    "planner": workflow_pb2_grpc.WorkflowServiceStub,
    "observability": audit_pb2_grpc.AuditServiceStub,
    "memory": memory_pb2_grpc.MemoryServiceStub,
    "policy": policy_pb2_grpc.PolicyServiceStub,
}
SettingsT = TypeVar("SettingsT", bound=MeshSettings)
_STACK_KEYS = ("AIOS_KAFKA_BOOTSTRAP", "AIOS_REDIS_URL", "AIOS_INFERENCE_URL", "AIOS_TOPIC_PREFIX",
               *(f"AIOS_{s.upper()}_ADDR" for s in SERVICES))
# The credential a call presents, taken as one group from the first place that has any of it: the
# environment, then the config file ($AIOS_CONFIG, else ~/.config/aios/config.toml), then the running
# embedded stack (its operator). Never mixed: a token from one place with a certificate from another.
CREDENTIAL_KEYS = ("AIOS_GRPC_AUTH", "AIOS_GRPC_TLS_CA_FILE", "AIOS_GRPC_TLS_CERT_FILE", "AIOS_GRPC_TLS_KEY_FILE",
                   "AIOS_TOKEN", "AIOS_TOKEN_FILE", "AIOS_AUTH_JWKS_FILE", "AIOS_AUTH_ISSUER", "AIOS_AUTH_AUDIENCE")


class CliError(Exception):
    """A failure to report as ``error: <message>`` and exit with ``code``."""

    def __init__(self, message: str, code: int = 1, *, status: str = "", unreachable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.status = status  # the gRPC status name, when a call failed
        self.unreachable = unreachable


def start_hint(var: str) -> str:
    return f"start the stack with `make up`, or set {var} to a running deployment"


def kafka_unreachable(bootstrap: str, exc: BaseException) -> CliError:
    return CliError(f"UNAVAILABLE: cannot reach Kafka at {bootstrap} ({exc}); {start_hint('AIOS_KAFKA_BOOTSTRAP')}",
                    unreachable=True)


def redis_unreachable(url: str, exc: BaseException) -> CliError:
    return CliError(f"UNAVAILABLE: cannot reach Redis at {mask_url(url)} ({exc}); {start_hint('AIOS_REDIS_URL')}",
                    unreachable=True)


def mask_url(url: str) -> str:
    """The URL without its password, for display."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


# -- settings ---------------------------------------------------------------------------------------
def stack_defaults() -> dict[str, str]:
    """Addresses of the embedded stack a ``make up`` left running (``.run/stack.json``), if any."""
    try:
        from infra.stack import Stack
    except ImportError:  # the aios-mesh image ships no embedded stack (a pod, the helm test)
        return {}

    run_dir = Path(os.environ["AIOS_RUN_DIR"]) if os.environ.get("AIOS_RUN_DIR") else None
    try:
        stack = Stack.attach(run_dir)
    except (OSError, ValueError, TypeError, KeyError):
        return {}
    if not any(proc.alive() for proc in stack.procs.values()):
        return {}
    from infra.stack import OPERATOR

    env = {**stack.env(), **stack.credentials_env(OPERATOR)}
    return {k: env[k] for k in (*_STACK_KEYS, *CREDENTIAL_KEYS) if env.get(k)}


def config_path() -> Path:
    return Path(os.environ.get("AIOS_CONFIG") or Path.home() / ".config" / "aios" / "config.toml")


def config_credentials() -> dict[str, str]:
    """Credential settings from the config file: ``[credentials]`` with the variables' names in lower
    case without AIOS_ (``grpc_auth``, ``grpc_tls_ca_file``, ``token_file``, ...)."""
    import tomllib

    path = config_path()
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CliError(f"cannot read the config file {path}: {exc}", code=2) from None
    table = doc.get("credentials", {})
    known = {k.removeprefix("AIOS_").lower() for k in CREDENTIAL_KEYS}
    unknown = sorted(set(table) - known)
    if unknown:
        raise CliError(f"{path}: unknown keys in [credentials]: {unknown}; known: {sorted(known)}", code=2)
    return {f"AIOS_{k.upper()}": str(v) for k, v in table.items()}


def load_cli_settings(cls: type[SettingsT]) -> SettingsT:
    """``cls`` (MeshSettings or a subclass) from the environment; variables not set fall back to the
    running embedded stack, credentials to the config file and then the stack (see CREDENTIAL_KEYS)."""
    found = stack_defaults()
    if any(k in os.environ for k in CREDENTIAL_KEYS):
        found = {k: v for k, v in found.items() if k not in CREDENTIAL_KEYS}
    elif (configured := config_credentials()):
        found = {**{k: v for k, v in found.items() if k not in CREDENTIAL_KEYS}, **configured}
    extra: dict[str, Any] = {k.removeprefix("AIOS_").lower(): v for k, v in found.items() if k not in os.environ}
    if extra:
        try:
            return cls(**extra)
        except ValidationError:
            pass
    return load_settings(cls)


# -- gRPC -------------------------------------------------------------------------------------------
def rpc_error(service: str, address: str, exc: grpc.RpcError) -> CliError:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    name = code.name if code is not None else "UNKNOWN"
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        var = f"AIOS_{service.upper()}_ADDR"
        return CliError(f"{name}: cannot reach the {service} at {address} ({details}); {start_hint(var)}",
                        status=name, unreachable=True)
    return CliError(f"{name}: {details}", status=name)


class Mesh:
    """Lazily opened channels to the mesh services, one per address."""

    def __init__(self, settings: MeshSettings) -> None:
        self.settings = settings
        self._channels: dict[str, grpc.Channel] = {}

    def address(self, service: str) -> str:
        return str(getattr(self.settings, f"{service}_addr"))

    def channel(self, service: str) -> grpc.Channel:
        if service not in self._channels:
            self._channels[service] = open_channel(self.address(service), self.client(service))
        return self._channels[service]

    def client(self, service: str) -> ClientAuth | None:
        """The credential for calls to ``service`` (None: plaintext)."""
        return client_for(self.settings, self.address(service))

    def rpc(self, service: str, method: str, request: Any, timeout: float = RPC_TIMEOUT_S) -> Any:
        """Call ``method`` on the service's stub; gRPC errors become ``CliError``."""
        stub = _STUBS[service](self.channel(service))
        try:
            return getattr(stub, method)(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise rpc_error(service, self.address(service), exc) from None

    def get_run(self, tenant: str, run_id: str) -> Any:
        return self.rpc("planner", "GetRun", workflow_pb2.GetRunRequest(tenant=tenant, run_id=run_id))

    def wait_for_run(self, tenant: str, run_id: str, timeout_s: float, poll_s: float = 0.25) -> Any:
        """Poll GetRun until a final state; the run may not exist yet right after the start command."""
        deadline = time.monotonic() + timeout_s
        last = "not started yet"
        while True:
            try:
                run = self.get_run(tenant, run_id)
                if run.status in FINAL_STATES:
                    return run
                last = run.status
            except CliError as exc:
                if exc.status != "NOT_FOUND":
                    raise
            if time.monotonic() >= deadline:
                raise CliError(f"DEADLINE_EXCEEDED: run {run_id} is {last} after {timeout_s:g}s; "
                               f"follow it with `aios workflows show {run_id}`")
            time.sleep(poll_s)

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()
        self._channels.clear()


class Context:
    """Settings and channels, opened on first use (``validate`` needs neither)."""

    def __init__(self) -> None:
        self._settings: Any = None
        self._mesh: Mesh | None = None

    @property
    def settings(self) -> Any:
        if self._settings is None:
            self._settings = load_cli_settings(MeshSettings)
        return self._settings

    @property
    def mesh(self) -> Mesh:
        if self._mesh is None:
            self._mesh = Mesh(self.settings)
        return self._mesh

    def close(self) -> None:
        if self._mesh is not None:
            self._mesh.close()


def client_for(settings: MeshSettings, address: str) -> ClientAuth | None:
    """Credentials for ``address``: those an embedded stack in this process registered for it, else the
    settings' (environment, config file or running stack)."""
    known, client = registered_client(address)
    if known:
        return client
    try:
        return ClientAuth.from_settings(settings)
    except ConfigError as exc:
        raise CliError(str(exc), code=2) from None


def open_channel(address: str, client: ClientAuth | None) -> grpc.Channel:
    if client is None:
        return grpc.insecure_channel(address)
    return client.secure_channel(address)


# -- health -----------------------------------------------------------------------------------------
@dataclass
class Check:
    name: str
    address: str
    up: bool
    detail: str


def grpc_health(name: str, address: str, timeout: float = HEALTH_TIMEOUT_S, *,
                settings: MeshSettings | None = None) -> Check:
    """Health needs no token, but travels over the service's TLS port with our certificate."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    client = client_for(settings, address) if settings is not None else client_auth_for(address)
    with open_channel(address, client) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                             timeout=timeout)
        except grpc.RpcError as exc:
            details = exc.details() or ""
            reason = "connection refused" if "Connection refused" in details else next(iter(details.splitlines()), "")
            return Check(name, address, False, f"{exc.code().name}: {reason}")
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    return Check(name, address, resp.status == health_pb2.HealthCheckResponse.SERVING, status)


def broker_health(bootstrap: str, prefix: str, timeout: float = 3.0, *,
                  client_config: Mapping[str, str] | None = None) -> Check:
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0, **(client_config or {})})
    try:
        topics = [t for t in admin.list_topics(timeout=timeout).topics if not t.startswith("__")]
    except KafkaException as exc:
        return Check("broker", bootstrap, False, str(exc))
    mine = sum(1 for t in topics if t.startswith(prefix))
    return Check("broker", bootstrap, True, f"{len(topics)} topics ({mine} with prefix {prefix!r})")


def redis_client(url: str, timeout: float = 5.0) -> Any:
    import redis

    return redis.Redis.from_url(url, decode_responses=True, socket_timeout=timeout, socket_connect_timeout=timeout)


def redis_health(url: str, timeout: float = 2.0) -> Check:
    import redis

    client = redis_client(url, timeout)
    try:
        client.ping()
        info = client.info()
    except redis.RedisError as exc:
        return Check("redis", mask_url(url), False, str(exc))
    finally:
        client.close()
    return Check("redis", mask_url(url), True,
                 f"PING ok, redis {info.get('redis_version', '?')}, used memory {info.get('used_memory_human', '?')}")


def _model_ids(payload: Any) -> list[str]:
    items = (payload.get("data") or payload.get("models") or []) if isinstance(payload, dict) else payload
    if not isinstance(items, list):
        return []
    return [str(m.get("id") or m.get("name") or m) if isinstance(m, dict) else str(m) for m in items]


def inference_health(url: str, timeout: float = 3.0) -> Check:
    import httpx

    base = url.rstrip("/")
    try:
        health = httpx.get(base + "/healthz", timeout=timeout)
        models = httpx.get(base + "/v1/models", timeout=timeout)
    except httpx.HTTPError as exc:
        return Check("inference", url, False, f"{type(exc).__name__}: {exc}")
    if health.status_code != 200:
        return Check("inference", url, False, f"/healthz answered {health.status_code}")
    if models.status_code != 200:
        return Check("inference", url, True, f"healthz ok; /v1/models answered {models.status_code}")
    try:
        ids = _model_ids(models.json())
    except ValueError:
        ids = []
    return Check("inference", url, True, f"healthz ok; models: {', '.join(ids) or 'none listed'}")


def all_checks(settings: MeshSettings) -> list[Check]:
    """Every component, checked concurrently; results in a fixed order."""
    jobs: list[Callable[[], Check]] = [
        *(lambda s=s: grpc_health(s, getattr(settings, f"{s}_addr"), settings=settings) for s in SERVICES),
        lambda: broker_health(settings.kafka_bootstrap, settings.topic_prefix,
                              client_config=settings.kafka_client_config()),
        lambda: redis_health(settings.redis_url),
        lambda: inference_health(settings.inference_url),
    ]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        return list(pool.map(lambda job: job(), jobs))
