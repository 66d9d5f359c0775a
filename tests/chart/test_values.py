"""values.schema.json refuses bad values with a message naming the key; the
templates refuse the combinations a schema cannot express, naming the value;
every value is documented in the chart README."""

from __future__ import annotations

import json

import pytest
from helm_python import HelmError

from tests.chart import kube, values_doc

pytestmark = pytest.mark.timeout(120)


def refusal(values: dict) -> str:
    with pytest.raises(HelmError) as info:
        kube.render_raw(kube.with_auth(values))
    return str(info.value)


@pytest.mark.parametrize(("values", "named"), [
    ({"services": {"planner": {"replicas": "two"}}}, "/services/planner/replicas"),
    ({"defaults": {"autoscaling": {"engine": "both"}}}, "/defaults/autoscaling/engine"),
    ({"kafka": {"securityProtocol": "TLS"}}, "/kafka/securityProtocol"),
    ({"kafka": {"bootstrap": "kafka"}}, "/kafka/bootstrap"),
    ({"redis": {"url": "redis://:hunter2@redis:6379/0"}}, "/redis/url"),
    ({"topics": {"partitions": {"ingres": 6}}}, "/topics/partitions"),
    ({"topics": {"replicationFactor": 0}}, "/topics/replicationFactor"),
    ({"inference": {"rayService": {"workerGroups": {"lowLatency": {"minReplicas": 0}}}}},
     "/inference/rayService/workerGroups/lowLatency/minReplicas"),
    ({"services": {"executor": {"connectors": {"BANK": "https://bank"}}}}, "/services/executor/connectors"),
    ({"services": {"planner": {"resources": {"requests": {"cpu": "lots"}}}}}, "/services/planner/resources"),
    ({"services": {"planner": {"env": {"AIOS_X": 3}}}}, "/services/planner/env/AIOS_X"),
    ({"services": {"search": {}}}, "'search' not allowed"),
    ({"monitoring": {"serviceMonitor": {"enabled": True, "intervall": "30s"}}}, "'intervall' not allowed"),
    ({"image": {"digest": "sha256:abc"}}, "/image/digest"),
    ({"services": {"executor": {"tenantRateLimit": {"tenants": {"acme": 0}}}}},
     "/services/executor/tenantRateLimit/tenants/acme"),
    ({"services": {"executor": {"tenantRateLimit": {"burst": 0}}}}, "/services/executor/tenantRateLimit/burst"),
    ({"services": {"observability": {"drift": {"stepRecords": 0}}}}, "/services/observability/drift/stepRecords"),
    ({"services": {"policy": {"reservationTtlSeconds": 0}}}, "/services/policy/reservationTtlSeconds"),
    ({"defaults": {"grpc": {"workers": 0}}}, "/defaults/grpc/workers"),
])
def test_schema_refuses_bad_values_naming_the_key(values: dict, named: str) -> None:
    assert named in refusal(values)


@pytest.mark.parametrize(("values", "named"), [
    ({"kafka": {"securityProtocol": "SASL_SSL", "sasl": {"mechanism": "PLAIN", "username": "u"}}},
     "kafka.sasl.existingSecret"),
    ({"kafka": {"sasl": {"username": "u"}}}, "kafka.sasl.* is set but kafka.securityProtocol=PLAINTEXT"),
    ({"kafka": {"tls": {"existingSecret": "ca"}}}, "kafka.tls.existingSecret is set"),
    ({"kafka": {"securityProtocol": "SSL", "tls": {"existingSecret": "ca", "certKey": "tls.crt"}}},
     "kafka.tls.certKey and kafka.tls.keyKey go together"),
    ({"kafka": {"securityProtocol": "SSL"}, "defaults": {"autoscaling": {"enabled": True}}}, "keda.authenticationRef"),
    ({"services": {"memory": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}}},
     "services.memory.autoscaling"),
    ({"inference": {"url": "", "rayService": {"enabled": False}}}, "inference.url"),
    ({"services": {"observability": {"drift": {"windowRecords": 450}}}},
     "services.observability.drift.windowRecords (450) must be a multiple"),
    ({"kafka": {"heartbeatIntervalMs": 10000}}, "kafka.heartbeatIntervalMs (10000) must be below"),
    ({"services": {"executor": {"claimThresholdBytes": 600000}}}, "services.executor.claimThresholdBytes (600000)"),
    ({"services": {"planner": {"standbyLeaseMs": 300, "autoscaling": {"enabled": True}}}},
     "services.planner: standbyLeaseMs > 0"),
])
def test_templates_refuse_inconsistent_values_naming_them(values: dict, named: str) -> None:
    assert named in refusal(values)


def test_global_is_allowed() -> None:
    kube.render(kube.with_auth({"global": {"imageRegistry": "registry.example.com", "anything": {"nested": True}}}))


def test_schema_is_strict_everywhere() -> None:
    """Every object schema either closes its properties or is a map/free-form Kubernetes object on purpose."""
    schema = json.loads((kube.CHART / "values.schema.json").read_text())
    open_on_purpose = {"global", "affinity", "podSecurityContext", "containerSecurityContext", "serveConfigV2"}

    def walk(node: dict, path: str) -> None:
        if node.get("type") == "object" and "properties" in node and path.rsplit(".", 1)[-1] not in open_on_purpose:
            assert node.get("additionalProperties") is False, f"{path} admits unknown keys"
        for key, child in node.get("properties", {}).items():
            walk(child, f"{path}.{key}")
        for key, child in node.get("definitions", {}).items():
            walk(child, f"{path}#{key}")

    walk(schema, "values")


def test_every_value_is_documented_in_the_readme() -> None:
    rows = values_doc.parse((kube.CHART / "values.yaml").read_text())
    undocumented = [r.path for r in rows if not r.description]
    assert not undocumented, f"values without a `# --` comment: {undocumented}"
    assert len(rows) > 100
    readme = (kube.CHART / "README.md").read_text()
    assert values_doc.readme_section(readme) == values_doc.table(rows), \
        "README values table is stale: run .venv/bin/python -m tests.chart.values_doc --write"


def test_values_doc_reports_an_undocumented_value() -> None:
    rows = values_doc.parse("a:\n  # -- documented\n  b: 1\n  c: 2\n# -- (object) whole\nd:\n  e: 1\n")
    assert [(r.path, r.description) for r in rows] == [("a.b", "documented"), ("a.c", None), ("d", "whole")]


def test_notes_say_what_to_do_next() -> None:
    notes = kube.render_raw(kube.AUTH)["aios-mesh/templates/NOTES.txt"]
    assert f"helm test {kube.RELEASE}" in notes and "port-forward" in notes and "topics" in notes
