"""Every setting a service's code reads is a chart value: the chart renders its AIOS_* variable into
that service's container (the shared ConfigMap or the container's env) from a value of its own,
unless it is in NOT_CHART_VALUES below with the reason. A setting added to a settings class without
a chart value fails here, named, so a platform team on Kubernetes never has to find it in the code
and pass it through `env`. The rendered values must also be the code's defaults unless the chart
differs on purpose (CHART_DEFAULTS_DIFFER), so installing the chart changes no behaviour by accident."""

from __future__ import annotations

import collections
import copy
import json
from pathlib import Path
from typing import Any

import pytest

from tests.chart import kube, values_doc
from tests.chart.test_settings_env import _load, env_names, mesh_containers, settings_class

pytestmark = pytest.mark.timeout(120)

# Settings that are deliberately no chart value, per service, with why.
_EVERY_SERVICE = {
    # The chart mounts the token from a Secret as a file (AIOS_TOKEN_FILE), re-read when it rotates;
    # a token in the pod spec would be readable by anyone who can read the pod.
    "AIOS_TOKEN": "the token is a mounted file (AIOS_TOKEN_FILE)",
}
_NO_PII_KEY = {
    # Only policy (seals) and executor (opens) hold the PII master key; no other pod mounts it.
    "AIOS_PII_KEY_FILE": "the PII key is mounted into policy and executor only",
}
NOT_CHART_VALUES: dict[str, dict[str, str]] = {
    "planner": _EVERY_SERVICE | _NO_PII_KEY,
    "executor": _EVERY_SERVICE | {
        # The demo's stand-in for every third-party API; on a cluster each connector's base URL is
        # services.executor.connectors (AIOS_BANK_URL, ...), which wins over it in connectors.yaml.
        "AIOS_SANDBOX_URL": "demo sandbox; connectors are services.executor.connectors",
    },
    "memory": _EVERY_SERVICE | _NO_PII_KEY,
    "policy": _EVERY_SERVICE | {
        # Must be the executor's connectors.yaml (both sides read one declaration of amounts); that
        # file is in the image and the executor has no setting to move it, so neither may policy.
        "AIOS_POLICY_TOOLS_FILE": "the image's connectors.yaml, the same file the executor reads",
        # A Deployment: policy consumes no topic, so it has no static group membership to keep.
        "AIOS_INSTANCE_ID": "a Deployment, no consumer group",
    },
    "observability": _EVERY_SERVICE | _NO_PII_KEY | {
        # Removed (the audit trail is kept by time); the service refuses it, naming its replacement.
        "AIOS_OBSERVABILITY_RETENTION": "removed: auditRetentionDays replaces it",
    },
}

# Settings whose chart default differs from the code's on purpose (the code's suits the embedded
# stack on one machine; a cluster needs these).
CHART_DEFAULTS_DIFFER = {
    "AIOS_KAFKA_BOOTSTRAP", "AIOS_REDIS_URL", "AIOS_INFERENCE_URL", "AIOS_GRPC_LISTEN_ADDR", "AIOS_METRICS_HOST",
    "AIOS_INFERENCE_INTERACTIVE_URL",  # the low-latency tier's door on the cluster; the code has none by default
    *(f"AIOS_{name.upper()}_ADDR" for name in kube.SERVICES),  # the cluster's addresses, not loopback
    "AIOS_FETCH_WAIT_MS",  # real Kafka wakes a waiting fetch; the embedded broker does not
    "AIOS_SESSION_TIMEOUT_MS",  # pods restart slower than processes on one machine
    "AIOS_CREATE_TOPICS_AT_START",  # the topics hook Job creates them
    "AIOS_INSTANCE_ID",  # the StatefulSet's pod name
    "AIOS_AUTH_ISSUER",  # no default: the cluster's token issuer
    # Files the chart mounts (gRPC credentials, JWKS, Cedar policies).
    "AIOS_GRPC_TLS_CA_FILE", "AIOS_GRPC_TLS_CERT_FILE", "AIOS_GRPC_TLS_KEY_FILE", "AIOS_TOKEN_FILE",
    "AIOS_AUTH_JWKS_FILE", "AIOS_AUTHZ_POLICY_FILE", "AIOS_AUTHZ_SCHEMA_FILE",
}


def _without_passthrough(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` without `env`/`extraEnv`: a setting only reachable through them is no chart value."""
    out = copy.deepcopy(values)
    for section in [out.get("defaults", {}), *out.get("services", {}).values()]:
        section.pop("env", None)
        section.pop("extraEnv", None)
    return out


def _every_null_value_set() -> dict[str, Any]:
    """Values with every value whose default is null ("null keeps the code's default") set to the
    smallest value its schema admits, so the variable it renders shows up."""
    schema = json.loads((kube.CHART / "values.schema.json").read_text())
    values: dict[str, Any] = {}
    for row in values_doc.parse((kube.CHART / "values.yaml").read_text()):
        if row.default is not None:
            continue
        node, target, parts = schema, values, row.path.split(".")
        for part in parts:
            node = node["properties"][part]
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        types = node["type"] if isinstance(node["type"], list) else [node["type"]]
        kind = next(t for t in types if t != "null")
        number = node.get("minimum", node.get("exclusiveMinimum", 0) + 1)
        target[parts[-1]] = {"integer": number, "number": number, "string": "set"}[kind]
    return kube.with_auth(values)


def _names(docs: list[dict[str, Any]]) -> dict[str, set[str]]:
    """{service: AIOS_* names its container gets}."""
    secrets: dict[tuple[str, str], str] = collections.defaultdict(lambda: "s3cret")
    found: dict[str, set[str]] = {}
    for template in kube.pod_templates(docs):
        if not template.owner.startswith(("StatefulSet/", "Deployment/")):
            continue
        for container in template.spec["containers"]:
            env = kube.container_env(docs, template, container, secrets)
            found.setdefault(container["name"], set()).update(n for n in env if n.startswith("AIOS_"))
    return found


def rendered_names(values_sets: list[dict[str, Any]]) -> dict[str, set[str]]:
    """Every AIOS_* name the chart renders per service over ``values_sets``."""
    union: dict[str, set[str]] = collections.defaultdict(set)
    for values in values_sets:
        for service, names in _names(kube.render(_without_passthrough(values))).items():
            union[service] |= names
    return union


# Values that render their variable only when not empty, and that no preset sets.
OPTIONAL_VALUES = kube.with_auth({"services": {"executor": {"plugins": "acme_tools"},
                                               "memory": {"seedTenant": "acme"}}})


@pytest.fixture(scope="module")
def chart_names() -> dict[str, set[str]]:
    return rendered_names([*kube.presets().values(), _every_null_value_set(), OPTIONAL_VALUES])


def _settings_classes() -> dict[str, type]:
    classes = {}
    for template in kube.pod_templates(kube.render_preset("default")):
        for container in template.spec["containers"]:
            if template.owner.startswith(("StatefulSet/", "Deployment/")):
                classes[container["name"]] = settings_class(template.owner, container)
    assert set(classes) == set(kube.SERVICES)
    return classes


def not_a_value(cls: type, service: str, names: set[str]) -> list[str]:
    """The settings of ``cls`` the chart does not render for ``service`` and does not exempt."""
    return sorted(env_names(cls) - names - set(NOT_CHART_VALUES[service]))


@pytest.mark.parametrize("service", kube.SERVICES)
def test_every_setting_of_the_service_is_a_chart_value(service: str, chart_names: dict[str, set[str]]) -> None:
    cls = _settings_classes()[service]
    missing = not_a_value(cls, service, chart_names[service])
    assert not missing, (f"{service}: {cls.__name__} has settings the chart cannot set (only through `env`): "
                         f"{missing}; add a value for each (values.yaml, values.schema.json, templates/"
                         "_service_env.tpl or the shared ConfigMap), or list it in NOT_CHART_VALUES with why")


@pytest.mark.parametrize("service", kube.SERVICES)
def test_the_exceptions_are_settings_the_chart_does_not_set(service: str, chart_names: dict[str, set[str]]) -> None:
    names = env_names(_settings_classes()[service])
    for name in NOT_CHART_VALUES[service]:
        assert name in names, f"{service}: NOT_CHART_VALUES names {name}, which is no setting of the service"
        assert name not in chart_names[service], f"{service}: {name} is a chart value now; drop it from NOT_CHART_VALUES"


def test_a_new_setting_without_a_value_is_reported(chart_names: dict[str, set[str]]) -> None:
    """The check can fail: a setting added to the class, or one reachable only through `env`."""
    from pydantic import Field

    from services.observability.settings import ObservabilitySettings

    class WithNewKnob(ObservabilitySettings):
        observability_new_knob: int = Field(1)

    assert not_a_value(WithNewKnob, "observability", chart_names["observability"]) == \
        ["AIOS_OBSERVABILITY_NEW_KNOB"]
    via_env = kube.with_auth({"services": {"observability": {"env": {"AIOS_OBSERVABILITY_NEW_KNOB": "2"}}}})
    assert "AIOS_OBSERVABILITY_NEW_KNOB" not in rendered_names([via_env])["observability"]


def test_chart_defaults_are_the_code_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """With the chart's defaults each service gets the settings its code has on its own, except
    CHART_DEFAULTS_DIFFER."""
    checked = set()
    for template, container, env in mesh_containers("default", tmp_path):
        if not template.owner.startswith(("StatefulSet/", "Deployment/")):
            continue
        cls = settings_class(template.owner, container)
        prefix = str(cls.model_config.get("env_prefix", "")).upper()
        chart = _load(cls, env, monkeypatch, capsys)
        code = _load(cls, {}, monkeypatch, capsys)
        differ = sorted(f"{prefix}{f.upper()}={getattr(chart, f)!r} (code: {getattr(code, f)!r})"
                        for f in cls.model_fields
                        if prefix + f.upper() in env and prefix + f.upper() not in CHART_DEFAULTS_DIFFER
                        and getattr(chart, f) != getattr(code, f))
        assert not differ, f"{container['name']}: values.yaml's defaults are not the code's: {differ}"
        checked.add(container["name"])
    assert checked == set(kube.SERVICES)

