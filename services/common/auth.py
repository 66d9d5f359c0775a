"""Who is calling: TLS credentials for servers and channels, bearer tokens
(JWT) verified against pinned keys, and the server interceptor that turns a
call's token into a ``Principal`` for the servicer (``services.common.authz``).

The contract at the edge, in the order a call meets it:

1. Transport (``AIOS_GRPC_AUTH``). ``mtls``: the connection is TLS and the
   client shows a certificate signed by the mesh CA, or the handshake fails.
   ``tls``: TLS, no client certificate. ``none``: plaintext, no tokens and no
   authorization (tests and local experiments only; a warning says so).
2. Token. Every call except health and reflection carries
   ``authorization: Bearer <JWT>``. The signature must verify with a key from
   the pinned JWKS file (chosen by ``kid``; the algorithm is pinned to EdDSA,
   so a token cannot pick ``none`` or an HMAC with the public key), and
   ``iss``, ``aud``, ``exp``, ``nbf`` and ``iat`` must hold. Anything else is
   UNAUTHENTICATED with a reason that names the failed check and never echoes
   the token.
3. Binding. A service token (``sub`` ``service:<name>``) is accepted only over
   a connection whose client certificate names that service (its CN): a
   service's token is worthless without its private key. Under ``tls`` there
   is no certificate to bind to, which is why ``mtls`` is the default.

Health and reflection need no token (probes and ``grpcurl`` must work without
one) but still arrive over the same TLS port; they reveal serving status and
the API's shape, never tenant data."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
from prometheus_client import Counter

from services.common.auth_client import (  # noqa: F401  (the client side, re-exported: one import for both)
    ClientAuth,
    TokenSource,
    _exit_on_config_error,
    _read,
    _stamp,
    client_auth_for,
    load_client_auth,
    register_endpoint,
    registered_client,
    unregister_endpoint,
)
from services.common.errors import ConfigError
from services.common.settings import GrpcAuthSettings

__all__ = ["ANONYMOUS", "AuthError", "acting_as", "AuthInterceptor", "ClientAuth", "Principal", "ServerAuth", "TokenSource",
           "TokenVerifier",
           "client_auth_for", "current_principal", "load_client_auth", "load_server_auth", "register_endpoint",
           "registered_client",
           "unregister_endpoint"]

log = logging.getLogger(__name__)

OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                        "/grpc.reflection.v1.ServerReflection/")
ALGORITHMS = ["EdDSA"]
_SUBJECT = re.compile(r"^(user|service):([A-Za-z0-9_.@+-]{1,128})$")
_NAME = re.compile(r"^[A-Za-z0-9_.*-]{1,64}$")
_CACHE_MAX = 4096

# Reasons are a fixed set: they are metric label values and must stay bounded.
AUTH_FAILURES = Counter("aios_grpc_auth_failures_total",
                        "gRPC calls refused as UNAUTHENTICATED, by reason", ["reason"])


class AuthError(Exception):
    """A credential was missing or did not verify; ``reason`` is one of a fixed set of words."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Principal:
    """The authenticated caller: ``user:alice`` or ``service:planner``, its tenants and roles."""

    kind: str
    name: str
    tenants: frozenset[str] = frozenset()
    roles: frozenset[str] = frozenset()
    default_tenant: str = ""
    authenticated: bool = True

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.name}"

    @property
    def all_tenants(self) -> bool:
        return "*" in self.tenants

    def tenant_for(self, requested: str) -> str:
        """The tenant a call acts for: the one it names, else the principal's own (one, or its default)."""
        if requested:
            return requested
        if self.default_tenant:
            return self.default_tenant
        own = sorted(t for t in self.tenants if t != "*")
        return own[0] if len(own) == 1 and not self.all_tenants else ""


# The principal of calls served while AIOS_GRPC_AUTH=none: not authenticated, so authz lets the
# request's own tenant field stand (the behaviour before authentication existed).
ANONYMOUS = Principal(kind="anonymous", name="unauthenticated", authenticated=False)
_current: ContextVar[Principal | None] = ContextVar("aios_principal", default=None)


def current_principal() -> Principal | None:
    """The principal of the gRPC call being served on this thread (None outside a call)."""
    return _current.get()


@contextmanager
def acting_as(principal: Principal) -> Iterator[Principal]:
    """Run the enclosed code as ``principal`` (tests that call a servicer without the interceptor)."""
    reset = _current.set(principal)
    try:
        yield principal
    finally:
        _current.reset(reset)


# -- tokens ---------------------------------------------------------------------------------------
def _load_jwks(path: str) -> dict[str, Any]:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"AIOS_AUTH_JWKS_FILE={path}: not a readable JWKS file ({exc})") from None
    keys: dict[str, Any] = {}
    for jwk in doc.get("keys", []) if isinstance(doc, dict) else []:
        if not isinstance(jwk, dict) or not jwk.get("kid"):
            raise ConfigError(f"AIOS_AUTH_JWKS_FILE={path}: every key needs a kid")
        try:
            keys[str(jwk["kid"])] = jwt.PyJWK(jwk, algorithm="EdDSA").key
        except jwt.PyJWTError as exc:
            raise ConfigError(f"AIOS_AUTH_JWKS_FILE={path}: key {jwk['kid']!r} is not an Ed25519 key ({exc})") from None
    if not keys:
        raise ConfigError(f"AIOS_AUTH_JWKS_FILE={path}: no keys")
    return keys


class TokenVerifier:
    """Verifies bearer tokens against pinned public keys (a JWKS file, re-read when it changes)."""

    def __init__(self, jwks_file: str, *, issuer: str, audience: str, leeway_s: int = 30,
                 clock: Callable[[], float] = time.time) -> None:
        self.jwks_file, self.issuer, self.audience, self.leeway_s = jwks_file, issuer, audience, leeway_s
        self.clock = clock
        self._keys = _load_jwks(jwks_file)
        self._stamp = _stamp(jwks_file)
        self._checked = time.monotonic()
        self._cache: dict[str, tuple[Principal, float]] = {}
        self._lock = threading.Lock()

    def _refresh_keys(self) -> None:
        # Key rotation without a restart: a changed JWKS file replaces the keys (and forgets every
        # token verified with the old ones). A broken file keeps the keys we have, loudly.
        if time.monotonic() - self._checked < 1.0:
            return
        self._checked = time.monotonic()
        stamp = _stamp(self.jwks_file)
        if stamp == self._stamp:
            return
        try:
            keys = _load_jwks(self.jwks_file)
        except ConfigError as exc:
            log.error("keeping the previous token keys: %s", exc)
            return
        with self._lock:
            self._keys, self._stamp = keys, stamp
            self._cache.clear()

    def verify(self, token: str) -> Principal:
        """The principal a token names; AuthError says which check failed."""
        self._refresh_keys()
        now = self.clock()
        hit = self._cache.get(token)
        if hit is not None and now < hit[1] + self.leeway_s:
            return hit[0]
        claims = self._claims(token)
        principal = principal_from_claims(claims)
        with self._lock:
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[token] = (principal, float(claims["exp"]))
        return principal

    def _claims(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("malformed", "the bearer token is not a JWT") from None
        if header.get("alg") not in ALGORITHMS:
            raise AuthError("malformed", f"token algorithm {header.get('alg')!r} is not accepted (only EdDSA)")
        key = self._keys.get(str(header.get("kid", "")))
        if key is None:
            raise AuthError("unknown_key", f"token signed by an unknown key (kid {str(header.get('kid'))[:64]!r}); "
                            "only the issuer's pinned keys are accepted")
        try:
            return jwt.decode(token, key, algorithms=ALGORITHMS, audience=self.audience, issuer=self.issuer,
                              leeway=self.leeway_s, options={"require": ["exp", "iat", "iss", "aud", "sub"]})
        except jwt.ExpiredSignatureError:
            raise AuthError("expired", "token expired: get a new one") from None
        except jwt.InvalidAudienceError:
            raise AuthError("wrong_audience", f"token is not for this audience (want {self.audience!r})") from None
        except jwt.InvalidIssuerError:
            raise AuthError("wrong_issuer", f"token was not issued by {self.issuer!r}") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("not_yet_valid", "token is not valid yet (nbf/iat in the future)") from None
        except jwt.InvalidSignatureError:
            raise AuthError("bad_signature", "token signature does not verify") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError("malformed", f"token lacks the {exc.claim!r} claim") from None
        except jwt.PyJWTError as exc:
            raise AuthError("malformed", f"token rejected: {type(exc).__name__}") from None


def _names(claims: Mapping[str, Any], key: str) -> frozenset[str]:
    value = claims.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and _NAME.match(v) for v in value):
        raise AuthError("malformed", f"token claim {key!r} must be a list of names")
    return frozenset(value)


def principal_from_claims(claims: Mapping[str, Any]) -> Principal:
    """A Principal from verified claims: ``sub`` kind:name, ``tenants``, ``roles``, optional ``tenant``."""
    match = _SUBJECT.match(str(claims.get("sub", "")))
    if not match:
        raise AuthError("malformed", "token subject must be user:<name> or service:<name>")
    tenants, roles = _names(claims, "tenants"), _names(claims, "roles")
    default = claims.get("tenant", "")
    if not isinstance(default, str) or (default and default not in tenants and "*" not in tenants):
        raise AuthError("malformed", "token claim 'tenant' must be one of its tenants")
    return Principal(kind=match.group(1), name=match.group(2), tenants=tenants, roles=roles, default_tenant=default)


def bearer(metadata: Iterable[tuple[str, Any]] | None) -> str:
    """The bearer token of a call's metadata ('' when there is none)."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value[:7].lower() == "bearer ":
            return value[7:].strip()
    return ""


def bind_to_peer(principal: Principal, auth_context: Mapping[str, Any], mode: str) -> None:
    """A service principal must come over mutual TLS with its own certificate."""
    if principal.kind != "service" or mode != "mtls":
        return
    names = [v.decode(errors="replace") if isinstance(v, bytes) else str(v)
             for v in auth_context.get("x509_common_name", [])]
    if names != [principal.name]:
        raise AuthError("certificate_mismatch", f"{principal.id} must connect with its own client certificate")


# -- the server side ------------------------------------------------------------------------------
class AuthInterceptor(grpc.ServerInterceptor):
    """Authenticates every call but health and reflection; the servicer reads the principal with
    ``current_principal()`` (authz.require does)."""

    def __init__(self, verifier: TokenVerifier | None, mode: str) -> None:
        self.verifier, self.mode = verifier, mode

    def authenticate(self, token: str, auth_context: Mapping[str, Any]) -> Principal:
        if self.verifier is None:
            return ANONYMOUS
        if not token:
            raise AuthError("missing", "no credential: send 'authorization: Bearer <token>' (aios reads "
                            "AIOS_TOKEN or AIOS_TOKEN_FILE)")
        principal = self.verifier.verify(token)
        bind_to_peer(principal, auth_context, self.mode)
        return principal

    def intercept_service(self, continuation: Callable[..., Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None or details.method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        if handler.unary_unary is None:
            return _refuse_streaming(handler)
        inner, token = handler.unary_unary, bearer(details.invocation_metadata)

        def authenticated(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                principal = self.authenticate(token, context.auth_context())
            except AuthError as exc:
                AUTH_FAILURES.labels(exc.reason).inc()
                context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
            reset = _current.set(principal)
            try:
                return inner(request, context)
            finally:
                _current.reset(reset)

        return grpc.unary_unary_rpc_method_handler(authenticated, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)


def _refuse_streaming(handler: Any) -> Any:
    # The mesh serves no streaming method outside health and reflection; refuse rather than pass
    # one through unauthenticated should somebody add it.
    def refuse(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "streaming methods are not served")

    return grpc.unary_unary_rpc_method_handler(refuse, request_deserializer=handler.request_deserializer,
                                               response_serializer=handler.response_serializer)


@dataclass(frozen=True)
class ServerAuth:
    """What a gRPC server needs: its TLS credentials and the token verifier (both None under ``none``)."""

    mode: str
    credentials: grpc.ServerCredentials | None = None
    verifier: TokenVerifier | None = None

    def interceptor(self) -> AuthInterceptor:
        return AuthInterceptor(self.verifier, self.mode)

    def bind(self, server: grpc.Server, address: str) -> int:
        """Add the listening port (TLS unless ``none``); the bound port, 0 when it could not bind.
        With authentication on, the authorization policies load now: a broken file stops the start."""
        if self.credentials is None:
            return int(server.add_insecure_port(address))
        from services.common import authz

        _exit_on_config_error("authorization", authz.authorizer)
        return int(server.add_secure_port(address, self.credentials))

    @classmethod
    def from_settings(cls, s: GrpcAuthSettings) -> ServerAuth:
        """Raises ConfigError naming every setting a server in this mode still lacks."""
        if s.grpc_auth == "none":
            return cls(mode="none")
        missing = [name for name, value in (
            ("AIOS_GRPC_TLS_CERT_FILE", s.grpc_tls_cert_file), ("AIOS_GRPC_TLS_KEY_FILE", s.grpc_tls_key_file),
            ("AIOS_AUTH_JWKS_FILE", s.auth_jwks_file), ("AIOS_AUTH_ISSUER", s.auth_issuer),
            ("AIOS_AUTH_AUDIENCE", s.auth_audience),
            *((("AIOS_GRPC_TLS_CA_FILE", s.grpc_tls_ca_file),) if s.grpc_auth == "mtls" else ())) if not value]
        if missing:
            raise ConfigError(f"{', '.join(missing)} required to serve gRPC with AIOS_GRPC_AUTH={s.grpc_auth} "
                              "(or set AIOS_GRPC_AUTH=none for a local test)")
        creds = grpc.ssl_server_credentials(
            [(_read(s.grpc_tls_key_file), _read(s.grpc_tls_cert_file))],
            root_certificates=_read(s.grpc_tls_ca_file) or None, require_client_auth=s.grpc_auth == "mtls")
        verifier = TokenVerifier(s.auth_jwks_file, issuer=s.auth_issuer, audience=s.auth_audience,
                                 leeway_s=s.auth_leeway_s)
        return cls(mode=s.grpc_auth, credentials=creds, verifier=verifier)


def load_server_auth() -> ServerAuth:
    """The server side from the environment; exits 2 naming the setting when something is missing."""
    from services.common.settings import load_settings

    settings = load_settings(GrpcAuthSettings)
    server = _exit_on_config_error("the gRPC server", lambda: ServerAuth.from_settings(settings))
    if server.mode == "none":
        log.warning("gRPC serves plaintext WITHOUT authentication or authorization (AIOS_GRPC_AUTH=none)")
    return server
