"""ServiceRuntime follows the settings the Helm chart sets: gRPC binds AIOS_GRPC_LISTEN_ADDR
while clients dial AIOS_<SERVICE>_ADDR, /metrics binds AIOS_METRICS_HOST, topics are left to
the topics Job when AIOS_CREATE_TOPICS_AT_START=false (and created by the Job's code path
otherwise), the Kafka clients get the SASL/TLS settings, and the static member id comes from
AIOS_INSTANCE_ID. Everything binds loopback addresses only."""

from __future__ import annotations

from typing import Any

import grpc
import httpx
import pytest
from confluent_kafka.admin import AdminClient
from grpc_health.v1 import health_pb2, health_pb2_grpc

from infra.stack import Stack, procs
from services.common import runtime
from services.common.catalog import Catalog
from services.common.settings import MeshSettings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _health(address: str) -> grpc.StatusCode | None:
    """None when a gRPC server answers health checks at ``address``, else the error's code."""
    with grpc.insecure_channel(address) as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError as exc:
            return exc.code()
    return None


def test_grpc_binds_the_listen_address_and_not_the_dialled_one() -> None:
    listen, dialled = procs.free_port(), procs.free_port()
    settings = MeshSettings(grpc_listen_addr=f"127.0.0.1:{listen}", planner_addr=f"127.0.0.1:{dialled}")
    rt = runtime.ServiceRuntime("listen-test", settings)
    server = rt.serve(settings.planner_addr, [])
    try:
        assert _health(f"127.0.0.1:{listen}") is None
        assert _health(f"127.0.0.1:{dialled}") == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(grace=0).wait(3)


def test_without_a_listen_address_grpc_binds_the_dialled_one() -> None:
    dialled = procs.free_port()
    settings = MeshSettings(planner_addr=f"127.0.0.1:{dialled}")
    server = runtime.ServiceRuntime("listen-test", settings).serve(settings.planner_addr, [])
    try:
        assert _health(f"127.0.0.1:{dialled}") is None
    finally:
        server.stop(grace=0).wait(3)


def test_metrics_bind_the_metrics_host() -> None:
    # 127.0.0.2 is loopback too, and tells "bound the setting" apart from "bound 127.0.0.1".
    port = procs.free_port()
    runtime.ServiceRuntime("metrics-host-test", MeshSettings(metrics_host="127.0.0.2"), metrics_port=port)
    page = httpx.get(f"http://127.0.0.2:{port}/metrics", timeout=5)
    assert page.status_code == 200 and 'aios_service_up{service="metrics-host-test"} 1.0' in page.text
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)


def _topics(bootstrap: str, prefix: str) -> dict[str, int]:
    meta = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10)
    return {name: len(t.partitions) for name, t in meta.topics.items() if name.startswith(prefix)}


def test_services_leave_topics_to_the_job_when_told(infra: Stack, prefix: str) -> None:
    bootstrap = infra.env()["AIOS_KAFKA_BOOTSTRAP"]
    settings = MeshSettings(kafka_bootstrap=bootstrap, topic_prefix=prefix, create_topics_at_start=False)
    runtime.ServiceRuntime("topics-test", settings).ensure_topics()
    assert _topics(bootstrap, prefix) == {}


def test_services_create_topics_through_the_jobs_code_path(
        infra: Stack, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # AIOS_TOPICS_PARTITIONS is read by the topics command only: honouring it shows the service
    # went through services.common.topics, not a path of its own.
    monkeypatch.setenv("AIOS_TOPICS_PARTITIONS", '{"approvals": 3}')
    bootstrap = infra.env()["AIOS_KAFKA_BOOTSTRAP"]
    settings = MeshSettings(kafka_bootstrap=bootstrap, topic_prefix=prefix)
    runtime.ServiceRuntime("topics-test", settings).ensure_topics()
    catalog = Catalog(prefix)
    expected = {spec.name: spec.partitions for spec in catalog.topics.values()}
    expected[catalog.topic("approvals")] = 3
    assert _topics(bootstrap, prefix) == expected
    runtime.ServiceRuntime("topics-test", settings).ensure_topics()  # the next start finds them all
    assert _topics(bootstrap, prefix) == expected


class _RecordingLoop:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs

    def start(self) -> _RecordingLoop:
        return self


def test_kafka_clients_and_member_ids_follow_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    produced: list[dict[str, Any]] = []
    monkeypatch.setattr(runtime, "ConsumerLoop", _RecordingLoop)
    monkeypatch.setattr(runtime, "MeshProducer", lambda *args, **kwargs: produced.append(kwargs))
    settings = MeshSettings(kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-512",
                            kafka_sasl_username="mesh", kafka_sasl_password="s3cret",
                            instance_id="aios-aios-mesh-planner-0")
    rt = runtime.ServiceRuntime("planner", settings)
    loop: Any = rt.consume("planner", ["ingress"], lambda _records: None)
    expected = settings.kafka_client_config()
    assert expected["sasl.password"] == "s3cret"
    assert produced == [{"client_config": expected}]
    assert loop.kwargs["client_config"] == expected
    # The chart's StatefulSet sets AIOS_INSTANCE_ID to the pod name; one process may consume in
    # several groups, so the group is part of the static member id.
    assert loop.kwargs["instance_id"] == "planner-aios-aios-mesh-planner-0"
    assert loop.kwargs["group"] == settings.topic_prefix + "planner"


def test_without_an_instance_id_membership_is_dynamic(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "ConsumerLoop", _RecordingLoop)
    monkeypatch.setattr(runtime, "MeshProducer", lambda *args, **kwargs: None)
    loop: Any = runtime.ServiceRuntime("policy", MeshSettings(instance_id="")).consume(
        "policy", ["ingress"], lambda _records: None)
    assert loop.kwargs["instance_id"] == ""
