"""Each rendered container's environment loads through the settings class of
the code it runs, so the chart can never ship a variable the code rejects or
ignores, nor leave one it needs at a default that only works on a laptop."""

from __future__ import annotations

import importlib
import ipaddress
import os
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic_settings import BaseSettings

from services.common.settings import MeshSettings, load_settings
from tests.chart import kube

pytestmark = pytest.mark.timeout(120)
PRESETS = sorted(kube.presets())


# The module a container runs -> where its settings class is (imported only once a container runs it).
SETTINGS_OF_MODULE = {
    "services.common.topics": ("services.common.topics", "TopicSettings"),
    "services.planner": ("services.planner.main", "PlannerSettings"),
    "services.executor": ("services.executor.main", "ExecutorSettings"),
    "services.memory": ("services.memory.main", "MemorySettings"),
    "services.policy": ("services.policy.settings", "PolicySettings"),
    "services.observability": ("services.observability.settings", "ObservabilitySettings"),
}


def settings_class(owner: str, container: dict[str, Any]) -> type[BaseSettings]:
    """The class the container's command loads its settings with."""
    command = container.get("command", [])
    if command[:2] == ["python", "-m"] and command[2] in SETTINGS_OF_MODULE:
        module, name = SETTINGS_OF_MODULE[command[2]]
        cls: type[BaseSettings] = getattr(importlib.import_module(module), name)
        return cls
    if command[:1] == ["aios"]:
        return MeshSettings  # tools/aios/clients.py: load_cli_settings
    if owner.startswith("RayService/"):
        from services.inference.main import InferenceSettings
        return InferenceSettings
    raise AssertionError(f"{owner}: no settings class known for command {command}")


def env_names(cls: type[BaseSettings]) -> set[str]:
    prefix = str(cls.model_config.get("env_prefix", "")).upper()
    return {prefix + name.upper() for name in cls.model_fields}


def read_outside_settings(source: str) -> set[str]:
    """AIOS_* variables the code under ``source`` reads directly (os.environ, ${VAR} in its YAML),
    not through its settings class."""
    names: set[str] = set()
    for path in (kube.REPO / source).rglob("*"):
        if path.suffix in (".py", ".yaml"):
            text = path.read_text()
            names |= set(re.findall(r"environ(?:\.get\(|\[)\s*[\"'](AIOS_[A-Z0-9_]+)", text))
            names |= set(re.findall(r"\$\{(AIOS_[A-Z0-9_]+)", text))
    return names


def fake_secrets(docs: list[dict[str, Any]]) -> dict[tuple[str, str], str]:
    """A plausible value for every secretKeyRef the chart renders."""
    values: dict[tuple[str, str], str] = {}
    for t in kube.pod_templates(docs):
        for c in t.spec["containers"]:
            for var in c.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    values[(ref["name"], ref["key"])] = \
                        "rediss://:s3cret@redis.data.svc:6379/0" if var["name"] == "AIOS_REDIS_URL" else "s3cret"
    return values


def fake_file(secret: str, key: str) -> bytes:
    """Content of a mounted Secret key: the settings only check that the file is readable
    (tests/chart/test_grpc_auth.py mounts real credentials and serves with them)."""
    return f"placeholder for key {key} of Secret {secret}\n".encode()


def mesh_containers(preset: str, root: Path | None = None) -> list[tuple[kube.PodTemplate, dict[str, Any],
                                                                         dict[str, str]]]:
    """(pod, container, environment) of every container. With ``root`` the container's volumes are laid
    out under it (kube.materialize) and paths inside them point there, so a setting that must name a
    readable file (AIOS_GRPC_TLS_*, AIOS_TOKEN_FILE, AIOS_AUTH_JWKS_FILE) is checked against what the
    pod really mounts."""
    docs = kube.render_preset(preset)
    secrets = fake_secrets(docs)
    found = []
    for i, t in enumerate(kube.pod_templates(docs)):
        for c in t.spec["containers"]:
            env = kube.container_env(docs, t, c, secrets)
            if root is not None:
                env = kube.localize(env, kube.materialize(docs, t, c, root / f"{i}-{c['name']}", fake_file))
            found.append((t, c, env))
    return found


def _load(cls: type[BaseSettings], env: dict[str, str], monkeypatch: pytest.MonkeyPatch,
          capsys: pytest.CaptureFixture[str]) -> Any:
    for name in list(os.environ):
        if name.startswith("AIOS_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    try:
        return load_settings(cls)
    except SystemExit:
        pytest.fail(f"{cls.__name__} refused the rendered environment:\n{capsys.readouterr().err}")


def _loopback(hostport: str) -> bool:
    host = hostport.rsplit("//", 1)[-1].rsplit("@", 1)[-1].split("/")[0].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@pytest.mark.parametrize("preset", PRESETS)
def test_every_container_env_loads_through_its_settings_class(
        preset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    checked = 0
    for template, container, env in mesh_containers(preset, tmp_path):
        cls = settings_class(template.owner, container)
        command = container.get("command") or []
        source = "services/inference" if template.owner.startswith("RayService/") else \
            "tools/aios" if command[0] == "aios" else command[2].replace(".", "/")
        allowed = env_names(cls) | read_outside_settings(source)
        unknown = sorted(n for n in env if n.startswith("AIOS_") and n not in allowed)
        assert not unknown, f"{template.owner}: {cls.__name__} has no setting for {unknown}"
        _load(cls, {k: v for k, v in env.items() if k.startswith("AIOS_")}, monkeypatch, capsys)
        checked += 1
    assert checked >= 5


@pytest.mark.parametrize("preset", PRESETS)
def test_services_get_cluster_addresses_not_laptop_defaults(
        preset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    values = kube.presets()[preset]
    topics_job = values.get("topics", {}).get("enabled", True)
    seen = set()
    for template, container, env in mesh_containers(preset, tmp_path):
        if not template.owner.startswith(("StatefulSet/", "Deployment/")):
            continue
        name = container["name"]
        seen.add(name)
        s = _load(settings_class(template.owner, container), env, monkeypatch, capsys)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        # Listen on the pod's interfaces, on the container's ports; dial the Services.
        listen = s.listen_addr(getattr(s, f"{name}_addr"))
        assert not _loopback(listen) and int(listen.rsplit(":", 1)[1]) == ports["grpc"], (name, listen)
        assert getattr(s, f"{name}_metrics_port") == ports["metrics"], name
        assert not ipaddress.ip_address(s.metrics_host).is_loopback, (name, s.metrics_host)
        for field in ("kafka_bootstrap", "redis_url", "inference_url", *(f"{n}_addr" for n in kube.SERVICES)):
            assert not _loopback(getattr(s, field)), f"{name}: {field}={getattr(s, field)} is a loopback default"
        if template.owner.startswith("StatefulSet/"):
            assert s.instance_id == template.owner.split("/")[1] + "-0", name
        else:
            assert s.instance_id == "", f"{name}: a Deployment's pod names change on every rollout"
        assert s.create_topics_at_start is (not topics_job), name
    assert seen == set(kube.SERVICES)


def test_kafka_security_reaches_the_client_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    # The settings name files inside the pod; loaded here with the pod's volumes laid out locally.
    def in_pod(path: str, local_env: dict[str, str], cluster_env: dict[str, str]) -> str:
        return next(cluster_env[k] for k, v in local_env.items() if v == path)

    cluster = {t.owner: env for t, _c, env in mesh_containers("production")}
    for template, container, env in mesh_containers("production", tmp_path / "production"):
        if template.owner.startswith("RayService/"):
            continue
        conf = _load(settings_class(template.owner, container), env, monkeypatch, capsys).kafka_client_config()
        assert conf["security.protocol"] == "sasl_ssl", template.owner
        assert conf["sasl.mechanism"] == "SCRAM-SHA-512" and conf["sasl.password"] == "s3cret", template.owner
        assert in_pod(conf["ssl.ca.location"], env, cluster[template.owner]) == "/etc/aios/kafka-tls/ca.crt", \
            template.owner
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert "/etc/aios/kafka-tls" in mounts, template.owner
    cluster = {t.owner: env for t, _c, env in mesh_containers("gpu")}
    for template, container, env in mesh_containers("gpu", tmp_path / "gpu"):
        if template.owner.startswith(("StatefulSet/", "Deployment/")):
            conf = _load(settings_class(template.owner, container), env, monkeypatch, capsys).kafka_client_config()
            pod_env = cluster[template.owner]
            assert in_pod(conf["ssl.certificate.location"], env, pod_env) == "/etc/aios/kafka-tls/tls.crt", \
                template.owner
            assert in_pod(conf["ssl.key.location"], env, pod_env) == "/etc/aios/kafka-tls/tls.key", template.owner


def test_topics_job_settings_carry_the_configured_topics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from services.common.catalog import Catalog
    from services.common.topics import plan

    for template, container, env in mesh_containers("production", tmp_path):
        if template.owner.startswith("Job/"):
            s = _load(settings_class(template.owner, container), env, monkeypatch, capsys)
            planned = {t.name: t for t in plan(Catalog(s.topic_prefix), s)}
            assert planned["prod.aios.ingress.events"].partitions == 12
            assert planned["prod.aios.approval.requests"].partitions == 2  # the catalog's
            assert {t.replication_factor for t in planned.values()} == {3}
            assert all(t.config["min.insync.replicas"] == "2" for t in planned.values())
            return
    pytest.fail("no topics Job rendered")


def test_an_unknown_variable_is_caught(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The check above can fail: a misspelt variable in `env` is reported."""
    docs = kube.render(kube.with_auth({"services": {"planner": {"env": {"AIOS_PLANNER_BATCHSIZE": "10"}}}}))
    template = next(t for t in kube.pod_templates(docs) if t.owner.endswith("-planner"))
    env = kube.container_env(docs, template, template.spec["containers"][0], fake_secrets(docs))
    from services.planner.main import PlannerSettings

    assert "AIOS_PLANNER_BATCHSIZE" in env and "AIOS_PLANNER_BATCHSIZE" not in env_names(PlannerSettings)
