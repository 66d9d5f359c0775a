"""The low-latency tier's direct door (inference.rayService.interactivePort): the port the replicas
bind (the Serve config's args.low_latency.direct_port), the low-latency workers' container port, the
Service on them and the services' AIOS_INFERENCE_INTERACTIVE_URL are one number; the Service selects
those workers only; the network policies let the services reach it; port 0 renders none of it."""

from __future__ import annotations

import collections
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from helm_python import HelmError

from services.inference.tiers import TierSpec
from tests.chart import kube

pytestmark = pytest.mark.timeout(120)
WITH_RAY = [p for p, v in sorted(kube.presets().items()) if v.get("inference", {}).get("rayService", {})
            .get("enabled", True)]
SERVICE = f"{kube.RELEASE}-aios-mesh-inference-interactive"
LOW_LATENCY = f"RayService/{kube.RELEASE}-aios-mesh-inference:worker low-latency"


def _low_latency_args(docs: list[dict[str, Any]]) -> dict[str, Any]:
    ray = kube.by_kind(docs, "RayService")[0]
    apps = yaml.safe_load(ray["spec"]["serveConfigV2"])["applications"]
    app = next(a for a in apps if a["import_path"] == "services.inference.app:app_builder")
    return dict(app.get("args", {}).get("low_latency", {}))


def _named_ports(template: kube.PodTemplate) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for c in template.spec["containers"] for p in c.get("ports", [])
            if "name" in p}


def _config(docs: list[dict[str, Any]]) -> dict[str, str]:
    return kube.find(docs, "ConfigMap", f"{kube.RELEASE}-aios-mesh-config")["data"]


def _mesh_pods(docs: list[dict[str, Any]]) -> list[kube.PodTemplate]:
    return [t for t in kube.pod_templates(docs) if t.owner.startswith(("StatefulSet/", "Deployment/"))]


def _port_listed(ports: list[dict[str, Any]] | None, name: str, number: int) -> bool:
    return not ports or any(p.get("port") in (name, number) for p in ports)


def _peer_matches(peer: dict[str, Any], pod: kube.PodTemplate) -> bool:
    """A NetworkPolicyPeer against a pod of the release's own namespace."""
    if "ipBlock" in peer:
        return False
    namespace = peer.get("namespaceSelector")
    if namespace is not None and namespace != {}:
        return False  # another namespace's labels: not ours to guess
    return kube.selector_matches(peer.get("podSelector", {}), pod.labels)


def _admitted(docs: list[dict[str, Any]], source: kube.PodTemplate, target: kube.PodTemplate,
              port_name: str, port: int) -> bool:
    """Whether the release's NetworkPolicies let ``source`` open ``port`` on ``target`` (ingress at the
    target, egress at the source; a pod no policy of that type selects is open that way)."""
    policies = kube.by_kind(docs, "NetworkPolicy")

    def allowed(kind: str, selected: kube.PodTemplate, other: kube.PodTemplate) -> bool:
        field, peers = ("ingress", "from") if kind == "Ingress" else ("egress", "to")
        governing = [p for p in policies if kind in p["spec"].get("policyTypes", ["Ingress"])
                     and kube.selector_matches(p["spec"]["podSelector"], selected.labels)]
        return not governing or any(
            _port_listed(rule.get("ports"), port_name, port)
            and (peers not in rule or any(_peer_matches(peer, other) for peer in rule[peers]))
            for p in governing for rule in p["spec"].get(field) or [])

    return allowed("Ingress", target, source) and allowed("Egress", source, target)


@pytest.mark.parametrize("preset", WITH_RAY)
def test_the_service_selects_only_low_latency_workers_on_the_door_port(preset: str) -> None:
    docs = kube.render_preset(preset)
    svc = kube.find(docs, "Service", SERVICE)
    selected = [t for t in kube.pod_templates(docs)
                if kube.selector_matches({"matchLabels": svc["spec"]["selector"]}, t.labels)]
    assert [t.owner for t in selected] == [LOW_LATENCY], "the door's Service must select the low-latency workers only"
    (port,) = svc["spec"]["ports"]
    door = _low_latency_args(docs)
    assert _named_ports(selected[0]).get(port["targetPort"]) == port["port"] == door["direct_port"] == \
        kube.presets()[preset].get("inference", {}).get("rayService", {}).get("interactivePort", 8010)
    assert door["direct_host"] == "0.0.0.0", "a door bound to loopback is unreachable through the Service"
    TierSpec(**door)  # the code takes what the chart renders
    others = [t.owner for t in kube.pod_templates(docs) if t.owner != LOW_LATENCY and "interactive" in _named_ports(t)]
    assert not others, f"only the low-latency workers serve the door, yet {others} name its port"


@pytest.mark.parametrize("preset", WITH_RAY)
def test_the_services_are_given_the_door_service_url(preset: str) -> None:
    docs = kube.render_preset(preset)
    svc = kube.find(docs, "Service", SERVICE)
    url = urlsplit(_config(docs)["AIOS_INFERENCE_INTERACTIVE_URL"])
    assert url.scheme == "http" and url.hostname == f"{SERVICE}.{kube.NAMESPACE}.svc"
    assert url.port == svc["spec"]["ports"][0]["port"]
    secrets: dict[tuple[str, str], str] = collections.defaultdict(lambda: "s3cret")
    pods = _mesh_pods(docs)
    assert len(pods) == len(kube.SERVICES)
    for pod in pods:
        for container in pod.spec["containers"]:
            env = kube.container_env(docs, pod, container, secrets)
            assert env["AIOS_INFERENCE_INTERACTIVE_URL"] == url.geturl(), pod.owner


@pytest.mark.parametrize("preset", WITH_RAY)
def test_network_policies_let_every_service_reach_the_door(preset: str) -> None:
    docs = kube.render_preset(preset)
    target = next(t for t in kube.pod_templates(docs) if t.owner == LOW_LATENCY)
    port = kube.find(docs, "Service", SERVICE)["spec"]["ports"][0]
    for pod in _mesh_pods(docs):
        assert _admitted(docs, pod, target, port["targetPort"], _named_ports(target)[port["targetPort"]]), \
            f"{pod.owner} cannot reach the door of {target.owner}"


def test_the_policy_check_can_refuse() -> None:
    """Without the door's policy the Ray pods admit only the Serve port, and the check says so."""
    docs = kube.render_preset("default")
    target = next(t for t in kube.pod_templates(docs) if t.owner == LOW_LATENCY)
    planner = next(t for t in _mesh_pods(docs) if t.owner.endswith("-planner"))
    assert _admitted(docs, planner, target, "interactive", 8010)
    without = [d for d in docs if not (d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == SERVICE)]
    assert not _admitted(without, planner, target, "interactive", 8010)
    assert _admitted(without, planner, target, "serve", 8000)


def test_port_zero_renders_no_door() -> None:
    docs = kube.render(kube.with_auth({"inference": {"rayService": {"interactivePort": 0}}}))
    assert not [d for d in docs if d["metadata"]["name"] == SERVICE], "no Service nor NetworkPolicy for the door"
    assert not [t.owner for t in kube.pod_templates(docs) if "interactive" in _named_ports(t)]
    assert _low_latency_args(docs).get("direct_port", 0) == 0
    assert _config(docs)["AIOS_INFERENCE_INTERACTIVE_URL"] == ""


@pytest.mark.parametrize(("values", "url"), [
    ({"inference": {"interactiveUrl": "http://door.ml.svc:8010"}}, "http://door.ml.svc:8010"),
    ({"inference": {"url": "http://inference.ml.svc:8000", "rayService": {"enabled": False}}}, ""),
    ({"inference": {"url": "http://inference.ml.svc:8000", "interactiveUrl": "http://door.ml.svc:8010",
                    "rayService": {"enabled": False}}}, "http://door.ml.svc:8010"),
    # The services call another inference service: this release's door would skip it (found in review).
    ({"inference": {"url": "http://inference.ml.svc:8000"}}, ""),
])
def test_an_explicit_url_wins_and_no_ray_service_means_none(values: dict[str, Any], url: str) -> None:
    docs = kube.render(kube.with_auth(values))
    assert _config(docs)["AIOS_INFERENCE_INTERACTIVE_URL"] == url


def test_a_custom_port_moves_every_piece() -> None:
    docs = kube.render(kube.with_auth({"inference": {"rayService": {"interactivePort": 9100}}}))
    target = next(t for t in kube.pod_templates(docs) if t.owner == LOW_LATENCY)
    assert _low_latency_args(docs)["direct_port"] == _named_ports(target)["interactive"] == 9100
    assert kube.find(docs, "Service", SERVICE)["spec"]["ports"][0]["port"] == 9100
    assert urlsplit(_config(docs)["AIOS_INFERENCE_INTERACTIVE_URL"]).port == 9100


def _serve_config_with(low_latency: dict[str, Any]) -> dict[str, Any]:
    config = kube.presets()["gpu"]["inference"]["rayService"]["serveConfigV2"]
    config["applications"][0]["args"]["low_latency"] = low_latency
    return config


@pytest.mark.parametrize(("values", "named"), [
    ({"serveConfigV2": _serve_config_with({"direct_port": 9000})}, "interactivePort"),
    ({"interactivePort": 0, "serveConfigV2": _serve_config_with({"direct_port": 8010})}, "interactivePort"),
    ({"serveConfigV2": _serve_config_with({"direct_host": "127.0.0.1"})}, "loopback"),
    ({"interactivePort": 8000}, "servePort"),
    ({"serveConfigV2": {"applications": [{"name": "other", "import_path": "other.app:build"}]}}, "interactivePort: 0"),
])
def test_a_door_the_chart_cannot_wire_is_refused(values: dict[str, Any], named: str) -> None:
    with pytest.raises(HelmError) as info:
        kube.render_raw(kube.with_auth({"inference": {"rayService": values}}))
    assert named in str(info.value)


def test_a_user_direct_host_is_kept() -> None:
    """An IPv6-only cluster binds the door to `::`; the chart adds only the port."""
    docs = kube.render(kube.with_auth({"inference": {"rayService": {
        "serveConfigV2": _serve_config_with({"direct_host": "::", "direct_port": 8010})}}}))
    assert _low_latency_args(docs) == {"direct_host": "::", "direct_port": 8010}
