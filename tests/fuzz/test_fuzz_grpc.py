"""Every method of every mesh gRPC service, called on real in-process servers (the real servicers on
the session's Redis, behind serve_grpc's interceptors) with requests generated from the protobuf
descriptors, and with raw bytes. Every answer is OK or a status with a message saying what was wrong;
never INTERNAL or UNKNOWN (an unhandled exception), never a hang (the call's deadline and the
example's)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor as d
from google.protobuf import message_factory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiosmesh.v1 import audit_pb2, memory_pb2, policy_pb2, workflow_pb2
from infra.stack import Stack
from services.planner.store import RunQueries
from services.planner.workflows import Registry, load_file
from tests.fuzz.conftest import EXAMPLES, examples
from tests.integration.mesh_servers import REPO, SERVICES, mesh_servers, seed_waiting_run
from tests.unit.planner_twins import RecordingPublisher

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
TENANT = f"fz{uuid.uuid4().hex[:6]}"
RUN = "run-fuzz-1"
MODULES = [workflow_pb2, memory_pb2, policy_pb2, audit_pb2]
METHODS = [(service, method) for module in MODULES for service in module.DESCRIPTOR.services_by_name.values()
           for method in service.methods]
BAD = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED}
FUZZ = settings(max_examples=examples(60), deadline=5000,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])

# Values the servicers know (the seeded run, deployed workflows, roles, tools) mixed with noise, so
# examples reach past the first lookup.
KNOWN = st.sampled_from([TENANT, RUN, "gate", "support-card-block", "order-recovery", "fraud-ops", "kb",
                         "bank.block_card", "run.started", "EUR", "", "*", "../x", "a" * 300, "{}", "[]",
                         '{"a": 1}', "null", "1e999", "-1"])
STRING = st.one_of(KNOWN, st.text(max_size=40))
# Fields that name something the servicers look up: mostly a value that exists, sometimes anything.
NAMED = {"tenant": st.just(TENANT), "run_id": st.just(RUN), "step_id": st.just("gate"), "collection": st.just("kb"),
         "workflow": st.sampled_from(["support-card-block", "order-recovery", "support-reply"]),
         "role": st.just("fraud-ops"), "tool": st.sampled_from(["bank.block_card", "commerce.refund", "noop"]),
         "action": st.sampled_from(["run_step", "start_workflow"]), "key": st.just("customer:42:city"),
         "subject": st.just("customer:42")}
INTS = {d.FieldDescriptor.TYPE_INT32: (-2**31, 2**31 - 1), d.FieldDescriptor.TYPE_SINT32: (-2**31, 2**31 - 1),
        d.FieldDescriptor.TYPE_SFIXED32: (-2**31, 2**31 - 1), d.FieldDescriptor.TYPE_INT64: (-2**63, 2**63 - 1),
        d.FieldDescriptor.TYPE_SINT64: (-2**63, 2**63 - 1), d.FieldDescriptor.TYPE_SFIXED64: (-2**63, 2**63 - 1),
        d.FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1), d.FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
        d.FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1), d.FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1)}


def _scalar(field: d.FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    t = field.type
    if t in INTS:
        lo, hi = INTS[t]
        return st.one_of(st.integers(lo, hi), st.sampled_from([0, 1, -1 if lo < 0 else 2, lo, hi]))
    if t == d.FieldDescriptor.TYPE_DOUBLE:
        return st.floats()
    if t == d.FieldDescriptor.TYPE_FLOAT:
        return st.floats(width=32)
    if t == d.FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == d.FieldDescriptor.TYPE_STRING:
        return st.one_of(NAMED[field.name], STRING) if field.name in NAMED else STRING
    if t == d.FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=40)
    if t == d.FieldDescriptor.TYPE_ENUM:
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), st.integers(-5, 100))
    return messages(field.message_type, depth + 1)


@st.composite
def _message(draw: st.DrawFn, desc: d.Descriptor, depth: int) -> Any:
    msg = message_factory.GetMessageClass(desc)()
    for field in desc.fields:
        if depth > 2 and field.type == d.FieldDescriptor.TYPE_MESSAGE or not draw(st.booleans()):
            continue  # unset: the default
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_f, value_f = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            for key, value in draw(st.dictionaries(_scalar(key_f, depth), _scalar(value_f, depth), max_size=3)).items():
                if value_f.type == d.FieldDescriptor.TYPE_MESSAGE:
                    getattr(msg, field.name)[key].CopyFrom(value)
                else:
                    getattr(msg, field.name)[key] = value
        elif field.is_repeated:
            getattr(msg, field.name).extend(draw(st.lists(_scalar(field, depth), max_size=3)))
        elif field.type == d.FieldDescriptor.TYPE_MESSAGE:
            getattr(msg, field.name).CopyFrom(draw(_scalar(field, depth)))
        else:
            setattr(msg, field.name, draw(_scalar(field, depth)))
    return msg


def messages(desc: d.Descriptor, depth: int = 0) -> st.SearchStrategy[Any]:
    """Random messages of ``desc``: each field set or not, with values of its type."""
    return _message(desc, depth)


@pytest.fixture(scope="module")
def addresses(infra: Stack) -> Iterator[dict[str, str]]:
    """The four services on real gRPC servers (AIOS_GRPC_AUTH=none: the request's tenant stands, so
    the examples reach the servicers' own checks), keyed by full service name."""
    import redis

    client = redis.Redis.from_url(infra.env()["AIOS_REDIS_URL"], decode_responses=True)
    seed_waiting_run(client, TENANT, RUN)
    registry = Registry([load_file(p) for p in sorted((REPO / "workflows").glob("*.yaml"))])
    with mesh_servers(client, registry, RecordingPublisher(), RunQueries(client)) as found:
        yield {SERVICES[name]: address for name, address in found.items()}


def _answer(address: str, path: str, payload: bytes) -> tuple[grpc.StatusCode, str]:
    with grpc.insecure_channel(address) as chan:
        call = chan.unary_unary(path, request_serializer=bytes, response_deserializer=bytes)
        try:
            call(payload, timeout=10)
        except grpc.RpcError as exc:
            return exc.code(), str(exc.details() or "")
    return grpc.StatusCode.OK, ""


def _clear(service: d.ServiceDescriptor, method: d.MethodDescriptor, code: grpc.StatusCode, details: str,
           request: Any) -> None:
    EXAMPLES["grpc requests"] += 1
    assert code not in BAD, f"{service.name}.{method.name} answered {code.name}: {details!r} to {request!r}"
    if code != grpc.StatusCode.OK:
        assert details.strip(), f"{service.name}.{method.name} answered {code.name} without a message"


@pytest.mark.parametrize(("service", "method"), METHODS, ids=[f"{s.name}.{m.name}" for s, m in METHODS])
def test_generated_requests(addresses: dict[str, str], service: d.ServiceDescriptor,
                            method: d.MethodDescriptor) -> None:
    @FUZZ
    @given(messages(method.input_type))
    def run(request: Any) -> None:
        code, details = _answer(addresses[service.full_name], f"/{service.full_name}/{method.name}",
                                request.SerializeToString())
        _clear(service, method, code, details, request)

    run()


@pytest.mark.parametrize(("service", "method"), METHODS, ids=[f"{s.name}.{m.name}" for s, m in METHODS])
def test_raw_bytes(addresses: dict[str, str], service: d.ServiceDescriptor, method: d.MethodDescriptor) -> None:
    @settings(FUZZ, max_examples=examples(10))
    @given(st.binary(max_size=64))
    def run(payload: bytes) -> None:
        code, details = _answer(addresses[service.full_name], f"/{service.full_name}/{method.name}", payload)
        _clear(service, method, code, details, payload)

    run()
