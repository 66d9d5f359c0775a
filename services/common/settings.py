"""Typed, validated settings. Every service subclasses ``MeshSettings``; all
variables share the ``AIOS_`` prefix and service-specific fields carry the
service name (``AIOS_PLANNER_GRPC_PORT``). A bad value stops the process with a
message that names the variable."""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

KafkaSecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
KafkaSaslMechanism = Literal["", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


GrpcAuthMode = Literal["mtls", "tls", "none"]
_REPO = Path(__file__).resolve().parents[2]


class GrpcAuthSettings(BaseSettings):
    """How gRPC calls are authenticated (services.common.auth) and authorized (services.common.authz).

    ``mtls`` (the default): TLS with a client certificate from the mesh CA on every connection, and a
    signed token on every call. ``tls``: TLS and tokens, no client certificates (where a service mesh
    already authenticates pods). ``none``: plaintext, no tokens, no authorization: tests and local
    experiments only. What a server additionally needs (its certificate, the issuer's keys) is checked
    when it starts serving; what a client needs, when it opens a channel."""

    model_config = SettingsConfigDict(env_prefix="AIOS_", extra="ignore", frozen=True)

    grpc_auth: GrpcAuthMode = Field("mtls", description="gRPC transport security: mtls, tls or none")
    grpc_tls_ca_file: str = Field("", description="CA bundle that signed the mesh's certificates")
    grpc_tls_cert_file: str = Field("", description="this process's certificate (server, and client under mtls)")
    grpc_tls_key_file: str = Field("", description="private key of AIOS_GRPC_TLS_CERT_FILE")
    token: SecretStr = Field(SecretStr(""), description="bearer token this process presents (JWT)")
    token_file: str = Field("", description="file holding the bearer token; re-read when it changes")
    auth_issuer: str = Field("", description="token issuer (iss) a server accepts")
    auth_audience: str = Field("aios-mesh", description="token audience (aud) a server accepts")
    auth_jwks_file: str = Field("", description="JWKS file of the issuer's pinned public keys")
    auth_leeway_s: int = Field(30, ge=0, le=300, description="clock skew allowed on exp/nbf/iat")
    authz_policy_file: Path = Field(_REPO / "policies" / "authz.cedar", description="Cedar policies")
    authz_schema_file: Path = Field(_REPO / "policies" / "authz.cedarschema", description="Cedar schema")
    authz_reload_s: float = Field(2.0, ge=0, description="how often the policy file is checked for changes "
                                  "(0: never reload)")

    @field_validator("grpc_tls_ca_file", "grpc_tls_cert_file", "grpc_tls_key_file", "token_file",
                     "auth_jwks_file")
    @classmethod
    def _readable(cls, value: str) -> str:
        if value and not os.access(value, os.R_OK):
            raise ValueError(f"cannot read {value}: no such file, or no permission")
        return value

    @model_validator(mode="after")
    def _grpc_auth_consistent(self) -> GrpcAuthSettings:
        problems = []
        given = {"AIOS_GRPC_TLS_CA_FILE": self.grpc_tls_ca_file, "AIOS_GRPC_TLS_CERT_FILE": self.grpc_tls_cert_file,
                 "AIOS_GRPC_TLS_KEY_FILE": self.grpc_tls_key_file, "AIOS_TOKEN": self.token.get_secret_value(),
                 "AIOS_TOKEN_FILE": self.token_file, "AIOS_AUTH_JWKS_FILE": self.auth_jwks_file}
        if self.grpc_auth == "none":
            problems += [f"{name} is set but AIOS_GRPC_AUTH=none (plaintext, no tokens): use mtls or tls, "
                         "or unset it" for name, value in given.items() if value]
        if bool(self.grpc_tls_cert_file) != bool(self.grpc_tls_key_file):
            problems.append("AIOS_GRPC_TLS_CERT_FILE and AIOS_GRPC_TLS_KEY_FILE go together")
        if self.token.get_secret_value() and self.token_file:
            problems.append("AIOS_TOKEN and AIOS_TOKEN_FILE are both set: keep one")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class GrpcLimitSettings(BaseSettings):
    """What one gRPC server takes at once (services.common.grpc_server): the largest request and the
    most calls in progress. A request over the size is refused before it is parsed, a call over the
    count before it takes a thread; both as RESOURCE_EXHAUSTED, so a flood of large or slow calls
    costs the server neither memory nor its worker threads."""

    model_config = SettingsConfigDict(env_prefix="AIOS_", extra="ignore", frozen=True)

    grpc_max_message_bytes: int = Field(8 << 20, ge=1024, le=64 << 20,
                                        description="largest gRPC request a server takes, bytes")
    grpc_max_concurrent_calls: int = Field(64, ge=1, le=10000,
                                           description="calls one gRPC server handles at once; more are refused "
                                           "with RESOURCE_EXHAUSTED (clients back off and retry)")
    grpc_workers: int = Field(16, ge=1, le=1000, description="threads that run a gRPC server's calls")


class MeshSettings(GrpcAuthSettings, GrpcLimitSettings):
    """Settings every service needs: where the broker, Redis and inference live."""

    model_config = SettingsConfigDict(env_prefix="AIOS_", extra="ignore", frozen=True)

    kafka_bootstrap: str = Field("127.0.0.1:19092", description="Kafka bootstrap servers (host:port,...)")
    # Kafka security. The defaults (PLAINTEXT, nothing else set) give the clients
    # exactly the configuration they had before these settings existed.
    kafka_security_protocol: KafkaSecurityProtocol = Field(
        "PLAINTEXT", description="librdkafka security.protocol")
    kafka_sasl_mechanism: KafkaSaslMechanism = Field("", description="SASL mechanism when the protocol is SASL_*")
    kafka_sasl_username: str = Field("", description="SASL username")
    kafka_sasl_password: SecretStr = Field(SecretStr(""), description="SASL password (from a Secret)")
    kafka_ssl_ca_location: str = Field("", description="CA bundle file; empty uses the system CAs")
    kafka_ssl_certificate_location: str = Field("", description="client certificate file (mutual TLS)")
    kafka_ssl_key_location: str = Field("", description="client private key file (mutual TLS)")
    kafka_ssl_endpoint_identification: Literal["https", "none"] = Field(
        "https", description="verify the broker's host name against its certificate (https) or not (none)")
    topic_prefix: str = Field("aios.", description="Prefix of every topic name; one deployment, one prefix")
    create_topics_at_start: bool = Field(
        True, description="each service creates missing catalog topics when it starts (embedded stack); "
        "false where a topics job owns them (Helm)")
    fetch_wait_ms: int = Field(
        10, ge=1, le=5000,
        description="consumer fetch.wait.max.ms; 10 on the embedded broker (it does not wake fetches), "
        "500 on real Kafka",
    )
    background_fetch_wait_ms: int = Field(
        250, ge=1, le=5000,
        description="fetch.wait.max.ms of consumers off the critical path of a run (memory writes; audit, "
        "events and usage for observability): each idle fetch costs the embedded broker CPU",
    )
    session_timeout_ms: int = Field(6000, ge=1000, le=300000, description="consumer group session timeout: "
                                    "how long a crashed member keeps its partitions (6000 = real Kafka's "
                                    "group.min.session.timeout.ms; the embedded stack's planners run 1000)")
    heartbeat_interval_ms: int = Field(0, ge=0, le=60000, description="consumer heartbeat.interval.ms; 0 = a "
                                       "fifth of the session timeout, at least 100 ms")
    standby_lease_ms: int = Field(0, ge=0, le=60000, description="hot standby: > 0 lets one replica of each "
                                  "consumer group be a member at a time, holding a Redis lease of this many ms "
                                  "(renewed every fifth of it); the others serve gRPC and stand by outside the "
                                  "group, and one joins when the lease lapses. 0 = every replica is a member "
                                  "and Kafka spreads the partitions over them (scale out)")
    redis_url: str = Field("redis://127.0.0.1:16379/0", description="Redis 8 URL")
    pii_key_file: str = Field("", description="PII master key (64 hex digits) of the reversible per-tenant "
                              "tokens: policy seals pii.tokenize_fields with it, the executor opens them at the "
                              "connector boundary; empty: those fields are masked instead")
    inference_url: str = Field("http://127.0.0.1:18000", description="Ray Serve inference router")
    inference_interactive_url: str = Field(
        "", description="the low-latency tier's direct door (its replicas' own HTTP port, past Serve's proxy and "
        "router) for interactive calls; empty, or unreachable, sends them through the router")
    # <service>_addr is what clients dial; grpc_listen_addr is what this process
    # binds. They differ behind a Kubernetes Service (bind 0.0.0.0:50051, dial
    # release-planner:50051); empty keeps the old behaviour (bind the dialled address).
    planner_addr: str = Field("127.0.0.1:50051", description="planner gRPC (WorkflowService)")
    executor_addr: str = Field("127.0.0.1:50052", description="executor gRPC (health only)")
    memory_addr: str = Field("127.0.0.1:50053", description="memory gRPC (MemoryService)")
    policy_addr: str = Field("127.0.0.1:50054", description="policy gRPC (PolicyService)")
    observability_addr: str = Field("127.0.0.1:50055", description="observability gRPC (AuditService)")
    grpc_listen_addr: str = Field("", description="host:port this process's gRPC server binds; "
                                  "empty binds its own AIOS_<SERVICE>_ADDR")
    metrics_host: str = Field("127.0.0.1", description="address /metrics binds; 0.0.0.0 in a pod so "
                              "Prometheus can scrape it")
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

    def listen_addr(self, advertised: str) -> str:
        """Where a gRPC server binds: ``grpc_listen_addr`` if set, else the address clients dial."""
        return self.grpc_listen_addr or advertised

    def kafka_client_config(self) -> dict[str, str]:
        """librdkafka security keys to merge into every producer, consumer and admin client."""
        conf: dict[str, str] = {}
        if self.kafka_security_protocol == "PLAINTEXT":
            return conf
        conf["security.protocol"] = self.kafka_security_protocol.lower()
        if self.kafka_security_protocol.startswith("SASL_"):
            conf["sasl.mechanism"] = self.kafka_sasl_mechanism
            conf["sasl.username"] = self.kafka_sasl_username
            conf["sasl.password"] = self.kafka_sasl_password.get_secret_value()
        if self.kafka_security_protocol.endswith("SSL"):
            conf["ssl.endpoint.identification.algorithm"] = self.kafka_ssl_endpoint_identification
            for key, path in (("ssl.ca.location", self.kafka_ssl_ca_location),
                              ("ssl.certificate.location", self.kafka_ssl_certificate_location),
                              ("ssl.key.location", self.kafka_ssl_key_location)):
                if path:
                    conf[key] = path
        return conf

    @field_validator("grpc_listen_addr")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if value and (not sep or not host or not port.isdigit() or not 0 < int(port) < 65536):
            raise ValueError("expected host:port, e.g. 0.0.0.0:50051 or [::]:50051")
        return value

    @field_validator("metrics_host")
    @classmethod
    def _ip_address(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError("expected an IP address to bind, e.g. 127.0.0.1, 0.0.0.0 or ::") from None
        return value

    @model_validator(mode="after")
    def _heartbeat_within_session(self) -> MeshSettings:
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            raise ValueError(f"AIOS_HEARTBEAT_INTERVAL_MS={self.heartbeat_interval_ms} must be below "
                             f"AIOS_SESSION_TIMEOUT_MS={self.session_timeout_ms} (a fifth of it is usual; 0 picks that)")
        return self

    @model_validator(mode="after")
    def _kafka_security_consistent(self) -> MeshSettings:
        # A half-configured security setup would otherwise surface as an opaque
        # broker-side disconnect minutes later; name the variables now.
        protocol = self.kafka_security_protocol
        problems = []
        sasl = {"AIOS_KAFKA_SASL_MECHANISM": self.kafka_sasl_mechanism,
                "AIOS_KAFKA_SASL_USERNAME": self.kafka_sasl_username,
                "AIOS_KAFKA_SASL_PASSWORD": self.kafka_sasl_password.get_secret_value()}
        if protocol.startswith("SASL_"):
            problems += [f"{name} is required when AIOS_KAFKA_SECURITY_PROTOCOL={protocol}"
                         for name, value in sasl.items() if not value]
        else:
            problems += [f"{name} is set but AIOS_KAFKA_SECURITY_PROTOCOL={protocol} does not use SASL "
                         "(use SASL_SSL or SASL_PLAINTEXT, or unset it)" for name, value in sasl.items() if value]
        tls = {"AIOS_KAFKA_SSL_CA_LOCATION": self.kafka_ssl_ca_location,
               "AIOS_KAFKA_SSL_CERTIFICATE_LOCATION": self.kafka_ssl_certificate_location,
               "AIOS_KAFKA_SSL_KEY_LOCATION": self.kafka_ssl_key_location}
        if not protocol.endswith("SSL"):
            problems += [f"{name} is set but AIOS_KAFKA_SECURITY_PROTOCOL={protocol} does not use TLS "
                         "(use SSL or SASL_SSL, or unset it)" for name, value in tls.items() if value]
        if bool(self.kafka_ssl_certificate_location) != bool(self.kafka_ssl_key_location):
            problems.append("AIOS_KAFKA_SSL_CERTIFICATE_LOCATION and AIOS_KAFKA_SSL_KEY_LOCATION go together "
                            "(mutual TLS needs both)")
        if problems:
            raise ValueError("; ".join(problems))
        return self


S = TypeVar("S", bound=BaseSettings)


def load_settings(cls: type[S]) -> S:
    """Build settings from the environment or exit(2) naming what is wrong."""
    try:
        return cls()
    except ValidationError as exc:
        prefix = str(cls.model_config.get("env_prefix", ""))
        lines = [f"invalid settings for {cls.__name__}:"]
        for err in exc.errors():
            if not err["loc"]:  # a check across settings: its message names them; its input is every value
                lines.append(f"  {err['msg']}")
                continue
            name = prefix + "_".join(str(p) for p in err["loc"]).upper()
            shown = "<hidden>" if any(w in name.lower() for w in ("password", "token")) else repr(err.get("input"))
            lines.append(f"  {name}={shown}: {err['msg']}")
        lines.append("fix the environment variable(s) above and start again")
        print("\n".join(lines), file=sys.stderr)
        raise SystemExit(2) from None
