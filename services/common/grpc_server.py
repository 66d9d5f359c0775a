"""gRPC bootstrap: every server gets health, reflection and one error mapping.

The mapping is where the error hierarchy meets the wire: InvalidArgument ->
INVALID_ARGUMENT, NotFound -> NOT_FOUND, Conflict -> ABORTED, PolicyDenied ->
PERMISSION_DENIED, other retryable errors -> UNAVAILABLE (clients may retry),
anything else -> INTERNAL."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common import tracing
from services.common.errors import AiosError, Conflict, InvalidArgument, NotFound, PolicyDenied
from services.common.logs import log_context

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


class _ErrorInterceptor(grpc.ServerInterceptor):
    """Maps mesh errors to status codes and continues the caller's trace."""

    def intercept_service(self, continuation: Callable[..., Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary
        method = details.method

        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            headers = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
            with tracing.span_from_headers(method, headers) as trace_id, \
                    log_context(tenant=getattr(request, "tenant", ""), trace_id=trace_id,
                                run_id=getattr(request, "run_id", "")):
                try:
                    return inner(request, context)
                except AiosError as exc:
                    context.abort(status_for(exc), str(exc))
                except Exception as exc:
                    if isinstance(exc, grpc.RpcError) or type(exc).__name__ == "_AbortError":
                        raise
                    log.exception("unhandled error in %s", method)
                    context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")

        return grpc.unary_unary_rpc_method_handler(
            wrapped, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


Registration = tuple[Callable[[Any, grpc.Server], None], Any, str]


def serve_grpc(address: str, registrations: Sequence[Registration], *, max_workers: int = 16,
               ready: bool = True) -> tuple[grpc.Server, health.HealthServicer]:
    """Start a server on ``address`` with the given servicers plus health and reflection.

    Each registration is (add_XServicer_to_server, servicer, full service name).
    With ``ready=False`` health answers NOT_SERVING until the caller flips it
    (the runtime does once its consumers have joined their groups)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                         interceptors=[_ErrorInterceptor()],
                         options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 8 << 20)])
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
    for add, servicer, name in registrations:
        add(servicer, server)
        names.append(name)
    reflection.enable_server_reflection(names, server)
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot bind gRPC on {address}: is the port in use?")
    server.start()
    set_serving(health_servicer, [name for _a, _s, name in registrations], ready)
    return server, health_servicer


def set_serving(servicer: health.HealthServicer, names: Sequence[str], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in [*names, ""]:
        servicer.set(name, status)


def channel(address: str) -> grpc.Channel:
    # Reconnect fast: a peer restarted by its supervisor is back within seconds, and
    # gRPC's default backoff (1 s growing to 120 s) would keep us away far longer.
    return grpc.insecure_channel(address, options=[
        ("grpc.enable_retries", 1), ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000)])


def trace_metadata() -> list[tuple[str, str]]:
    """Outgoing metadata carrying the current W3C trace context."""
    return list(tracing.inject().items())
