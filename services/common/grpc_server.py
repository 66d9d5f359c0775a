"""gRPC bootstrap: every server gets health, reflection and one error mapping.

The mapping is where the error hierarchy meets the wire: InvalidArgument ->
INVALID_ARGUMENT, NotFound -> NOT_FOUND, Conflict -> ABORTED, PolicyDenied ->
PERMISSION_DENIED, other retryable errors -> UNAVAILABLE (clients may retry),
anything else -> INTERNAL.

INTERNAL says which method failed and an error id, never the exception's text, stack or paths
(they may hold another tenant's data or the server's layout); the server log has the exception
under the same id. Every server also takes at most ``AIOS_GRPC_MAX_MESSAGE_BYTES`` per request and
``AIOS_GRPC_MAX_CONCURRENT_CALLS`` calls at once (RESOURCE_EXHAUSTED beyond), and a request that
does not parse is INVALID_ARGUMENT, not gRPC's own INTERNAL "Exception deserializing request"."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.instrumentation.grpc import client_interceptor, filters, grpcext, server_interceptor

from services.common import metrics, tracing
from services.common.auth import ServerAuth, client_auth_for, load_server_auth
from services.common.errors import AiosError, Conflict, InvalidArgument, NotFound, PolicyDenied
from services.common.logs import log_context
from services.common.settings import GrpcLimitSettings, load_settings

log = logging.getLogger(__name__)

_CODES: list[tuple[type[AiosError], grpc.StatusCode]] = [
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (Conflict, grpc.StatusCode.ABORTED),
    (PolicyDenied, grpc.StatusCode.PERMISSION_DENIED),
]


def status_for(exc: BaseException) -> grpc.StatusCode:
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code
    if isinstance(exc, AiosError):
        return grpc.StatusCode.UNAVAILABLE if exc.retryable else grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.INTERNAL


# Health checks and reflection are probes, not work: no spans for them.
_TRACED = filters.negate(filters.any_of(filters.service_prefix("grpc.health"),
                                        filters.service_prefix("grpc.reflection")))


def _split_method(method: str) -> tuple[str, str]:
    """"/pkg.Service/Method" -> ("pkg.Service", "Method")."""
    service, _, name = method.lstrip("/").rpartition("/")
    return service or "unknown", name or "unknown"


class _Refused:
    """What the deserializer hands the servicer wrapper instead of a request it refused."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        self.code, self.message = code, message


def _checked(deserialize: Callable[[bytes], Any] | None, method: str, max_bytes: int) -> Callable[[bytes], Any]:
    """``deserialize`` with the size limit and a clear refusal for bytes that do not parse. A
    deserializer that raises makes gRPC answer INTERNAL "Exception deserializing request!", so
    this one returns a ``_Refused`` that the call wrapper turns into the right status."""

    def parse(data: bytes) -> Any:
        if len(data) > max_bytes:
            return _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"the {method} request is {len(data)} bytes, over this server's {max_bytes}-byte limit "
                            "(AIOS_GRPC_MAX_MESSAGE_BYTES): send fewer items per call, or large payloads by "
                            "reference")
        if deserialize is None:
            return data
        try:
            return deserialize(data)
        except Exception as exc:  # protobuf's DecodeError, or anything a custom deserializer raises
            return _Refused(grpc.StatusCode.INVALID_ARGUMENT,
                            f"the {method} request is not a valid message of its type ({type(exc).__name__}): "
                            "check the client's generated code matches the server's proto")

    return parse


def new_error_id() -> str:
    """A short random id that ties an INTERNAL answer to its server log line."""
    return os.urandom(6).hex()


class _ErrorInterceptor(grpc.ServerInterceptor):
    """Maps mesh errors to status codes, counts and times every call, and binds the log context.
    The span itself is the OpenTelemetry gRPC server interceptor's, which runs outside this one
    and continues the caller's trace from the call's metadata."""

    def __init__(self, max_message_bytes: int) -> None:
        self.max_message_bytes = max_message_bytes

    def intercept_service(self, continuation: Callable[..., Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary
        method = details.method
        grpc_service, grpc_method = _split_method(method)
        probe = grpc_service.startswith("grpc.")  # health, reflection: not counted as work

        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            if isinstance(request, _Refused):
                if not probe:
                    _observe(grpc_service, grpc_method, request.code, time.perf_counter() - started)
                context.abort(request.code, request.message)
            with log_context(tenant=getattr(request, "tenant", ""), trace_id=tracing.current_trace_id(),
                             run_id=getattr(request, "run_id", "")):
                try:
                    return inner(request, context)
                except AiosError as exc:
                    code = status_for(exc)
                    context.abort(code, str(exc))
                except Exception as exc:
                    if isinstance(exc, grpc.RpcError) or type(exc).__name__ == "_AbortError":
                        code = _aborted_code(context)
                        raise
                    if isinstance(exc, NotImplementedError):  # a servicer older than the proto it serves
                        code = grpc.StatusCode.UNIMPLEMENTED
                        context.abort(code, f"{grpc_method} is not implemented by this server (an older version "
                                      "than the client's API?)")
                    error_id = new_error_id()
                    log.exception("unhandled error in %s (error id %s)", method, error_id)
                    code = grpc.StatusCode.INTERNAL
                    context.abort(code, f"{grpc_method} failed inside the server (error id {error_id}); "
                                  "the server's log has the details under that id")
                finally:
                    if not probe:
                        _observe(grpc_service, grpc_method, code, time.perf_counter() - started)

        return grpc.unary_unary_rpc_method_handler(
            wrapped, request_deserializer=_checked(handler.request_deserializer, grpc_method,
                                                   self.max_message_bytes),
            response_serializer=handler.response_serializer)


def _observe(grpc_service: str, grpc_method: str, code: grpc.StatusCode, seconds: float) -> None:
    metrics.GRPC_HANDLED.labels(grpc_service, grpc_method, code.name).inc()
    metrics.GRPC_SECONDS.labels(grpc_service, grpc_method).observe(seconds)


def _aborted_code(context: Any) -> grpc.StatusCode:
    """The code a servicer aborted with (the OpenTelemetry context wrapper records it)."""
    code = getattr(context, "_code", None) or getattr(context, "code", lambda: None)()
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


Registration = tuple[Callable[[Any, grpc.Server], None], Any, str]


def serve_grpc(address: str, registrations: Sequence[Registration], *, ready: bool = True,
               auth: ServerAuth | None = None,
               limits: GrpcLimitSettings | None = None) -> tuple[grpc.Server, health.HealthServicer]:
    """Start a server on ``address`` with the given servicers plus health and reflection.

    Each registration is (add_XServicer_to_server, servicer, full service name).
    With ``ready=False`` health answers NOT_SERVING until the caller flips it
    (the runtime does once its consumers have joined their groups). ``auth`` (default: from the
    AIOS_GRPC_*/AIOS_AUTH_* settings) gives TLS and the token check (services.common.auth);
    ``limits`` (default: from AIOS_GRPC_MAX_*) the request size and concurrent calls."""
    server_auth = auth or load_server_auth()
    limits = limits or load_settings(GrpcLimitSettings)
    max_bytes = limits.grpc_max_message_bytes
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=limits.grpc_workers),
                         # Authentication outermost: a refused call reaches no other interceptor or servicer.
                         interceptors=[server_auth.interceptor(), server_interceptor(filter_=_TRACED),
                                       _ErrorInterceptor(max_bytes)],
                         # Calls beyond this are refused with RESOURCE_EXHAUSTED before they take a thread.
                         maximum_concurrent_rpcs=limits.grpc_max_concurrent_calls,
                         # gRPC core drops a request over twice the limit unread (memory stays bounded);
                         # up to that, the deserializer above refuses it with a message naming the setting.
                         options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 2 * max_bytes)])
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
    for add, servicer, name in registrations:
        add(servicer, server)
        names.append(name)
    reflection.enable_server_reflection(names, server)
    if server_auth.bind(server, address) == 0:
        raise OSError(f"cannot bind gRPC on {address}: is the port in use?")
    server.start()
    set_serving(health_servicer, [name for _a, _s, name in registrations], ready)
    return server, health_servicer


def set_serving(servicer: health.HealthServicer, names: Sequence[str], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in [*names, ""]:
        servicer.set(name, status)


def channel(address: str) -> grpc.Channel:
    """A channel whose calls carry the caller's trace (a client span each, whose context the
    OpenTelemetry interceptor puts in the metadata)."""
    # Reconnect fast: a peer restarted by its supervisor is back within seconds, and
    # gRPC's default backoff (1 s growing to 120 s) would keep us away far longer.
    # A batch call answers about as much as it was sent: take answers as large as servers take requests.
    max_bytes = load_settings(GrpcLimitSettings).grpc_max_message_bytes
    options = [("grpc.enable_retries", 1), ("grpc.initial_reconnect_backoff_ms", 100),
               ("grpc.min_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000),
               ("grpc.max_receive_message_length", max_bytes), ("grpc.max_send_message_length", max_bytes)]
    client = client_auth_for(address)  # TLS and the bearer token (services.common.auth), or plaintext
    raw = grpc.insecure_channel(address, options=options) if client is None else \
        client.secure_channel(address, options=options)
    return grpcext.intercept_channel(raw, client_interceptor(filter_=_TRACED))


def trace_metadata() -> list[tuple[str, str]]:
    """Outgoing metadata carrying the current W3C trace context. Calls through ``channel`` get it
    from the interceptor (which replaces these entries with its client span's context); this is
    for channels made elsewhere."""
    return list(tracing.inject().items())
