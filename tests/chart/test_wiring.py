"""The rendered objects fit together, and fit the code: selectors match pods,
named ports exist, budgets and scalers point at real workloads, no `replicas`
under autoscaling, KEDA watches the consumer groups and topics the code uses."""

from __future__ import annotations

import ast
import importlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.common.catalog import Catalog
from tests.chart import kube

pytestmark = pytest.mark.timeout(120)
PRESETS = sorted(kube.presets())
WORKLOADS = ("Deployment", "StatefulSet")


def _ports(template: kube.PodTemplate) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for c in template.spec["containers"] for p in c.get("ports", [])
            if "name" in p}


def _templates(docs: list[dict[str, Any]]) -> list[kube.PodTemplate]:
    return list(kube.pod_templates(docs))


@pytest.mark.parametrize("preset", PRESETS)
def test_workload_selectors_match_their_own_pods_only(preset: str) -> None:
    docs = kube.render_preset(preset)
    templates = _templates(docs)
    for w in (d for d in docs if d["kind"] in WORKLOADS):
        selector = w["spec"]["selector"]
        own = w["spec"]["template"]["metadata"]["labels"]
        assert kube.selector_matches(selector, own), w["metadata"]["name"]
        others = [t.owner for t in templates if kube.selector_matches(selector, t.labels)
                  and t.owner != f"{w['kind']}/{w['metadata']['name']}"]
        assert not others, f"{w['metadata']['name']} selector also matches {others}"


@pytest.mark.parametrize("preset", PRESETS)
def test_services_select_pods_with_their_target_ports(preset: str) -> None:
    docs = kube.render_preset(preset)
    templates = _templates(docs)
    for svc in kube.by_kind(docs, "Service"):
        pods = [t for t in templates if kube.selector_matches({"matchLabels": svc["spec"]["selector"]}, t.labels)]
        assert pods, f"Service {svc['metadata']['name']} selects no pod"
        for port in svc["spec"]["ports"]:
            for pod in pods:
                target = port["targetPort"]
                assert target in _ports(pod) if isinstance(target, str) else target in _ports(pod).values(), \
                    f"Service {svc['metadata']['name']} port {port['name']}: {pod.owner} has no port {target}"


@pytest.mark.parametrize("preset", PRESETS)
def test_probes_use_the_grpc_port(preset: str) -> None:
    """Plaintext: the kubelet's gRPC probe on the grpc port. TLS: the exec probe dials the grpc port on
    loopback and verifies the certificate for the name the other services dial (AIOS_<SERVICE>_ADDR)."""
    docs = kube.render_preset(preset)
    config = kube.find(docs, "ConfigMap", f"{kube.RELEASE}-aios-mesh-config")["data"]
    tls = kube.presets()[preset].get("auth", {}).get("mode", "mtls") != "none"
    for t in _templates(docs):
        for c in t.spec["containers"]:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe not in c:
                    continue
                if not tls or t.owner.startswith("RayService/"):
                    assert c[probe]["grpc"]["port"] == _ports(t)["grpc"], f"{t.owner} {probe}"
                    continue
                command = c[probe]["exec"]["command"]
                script, address, server_name = command[1], command[-2], command[-1]
                assert command[0] == "python" and command[2:4] == ["--timeout", str(c[probe]["timeoutSeconds"])]
                assert address.rsplit(":", 1) == ["127.0.0.1", str(_ports(t)["grpc"])], f"{t.owner} {probe}"
                dialled = config[f"AIOS_{c['name'].upper()}_ADDR"].rsplit(":", 1)
                assert dialled == [server_name, str(_ports(t)["grpc"])], f"{t.owner} {probe}"
                mount = next(m for m in c["volumeMounts"] if script.startswith(m["mountPath"] + "/"))
                volume = next(v for v in t.spec["volumes"] if v["name"] == mount["name"])
                probe_map = kube.find(docs, "ConfigMap", volume["configMap"]["name"])
                assert script.rsplit("/", 1)[1] in probe_map["data"], f"{t.owner}: {script} is not mounted"
            if t.owner.startswith(("StatefulSet/", "Deployment/")):
                assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(c), t.owner
                assert c["resources"].get("requests") and c["resources"].get("limits"), t.owner


@pytest.mark.parametrize("preset", PRESETS)
def test_network_policies_select_pods_and_name_existing_ports(preset: str) -> None:
    docs = kube.render_preset(preset)
    templates = _templates(docs)
    for np in kube.by_kind(docs, "NetworkPolicy"):
        pods = [t for t in templates if kube.selector_matches(np["spec"]["podSelector"], t.labels)]
        assert pods, f"NetworkPolicy {np['metadata']['name']} selects no pod"
        for rule in np["spec"].get("ingress", []):
            for port in rule.get("ports", []):
                if isinstance(port["port"], str):
                    missing = [p.owner for p in pods if port["port"] not in _ports(p)]
                    assert not missing, f"{np['metadata']['name']}: port {port['port']} missing on {missing}"


def test_every_mesh_pod_may_call_every_service() -> None:
    """The release's own pods (services, test pod) are a gRPC peer of the services' policy."""
    docs = kube.render_preset("default")
    np = kube.find(docs, "NetworkPolicy", f"{kube.RELEASE}-aios-mesh-services")
    peers = [peer for rule in np["spec"]["ingress"] if {"port": "grpc", "protocol": "TCP"} in rule["ports"]
             for peer in rule["from"]]
    for t in _templates(docs):
        if not t.owner.startswith("RayService/"):
            assert any("podSelector" in p and "namespaceSelector" not in p
                       and kube.selector_matches(p["podSelector"], t.labels) for p in peers), t.owner


@pytest.mark.parametrize("preset", PRESETS)
def test_budgets_and_scalers_target_existing_workloads(preset: str) -> None:
    docs = kube.render_preset(preset)
    workloads = {(d["kind"], d["metadata"]["name"]): d for d in docs if d["kind"] in WORKLOADS}
    templates = _templates(docs)
    for pdb in kube.by_kind(docs, "PodDisruptionBudget"):
        matched = [t.owner for t in templates if kube.selector_matches(pdb["spec"]["selector"], t.labels)]
        assert len(matched) == 1 and matched[0].split("/")[0] in WORKLOADS, (pdb["metadata"]["name"], matched)
    scaled: dict[tuple[str, str], str] = {}
    for scaler in kube.by_kind(docs, "HorizontalPodAutoscaler") + kube.by_kind(docs, "ScaledObject"):
        ref = scaler["spec"]["scaleTargetRef"]
        key = (ref["kind"], ref["name"])
        assert key in workloads, f"{scaler['kind']} {scaler['metadata']['name']} targets missing {key}"
        assert key not in scaled, f"{key} scaled by both {scaled[key]} and {scaler['kind']}"
        scaled[key] = scaler["kind"]
    for key, w in workloads.items():
        if key in scaled:
            assert "replicas" not in w["spec"], f"{key} renders replicas under autoscaling"
        else:
            assert "replicas" in w["spec"], key


def test_no_replicas_and_one_scaler_per_service_when_autoscaling() -> None:
    docs = kube.render_preset("production")
    for name in kube.SERVICES:
        kinds = [d["kind"] for d in docs if d["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")
                 and d["spec"]["scaleTargetRef"]["name"] == f"{kube.RELEASE}-aios-mesh-{name}"]
        assert kinds == (["HorizontalPodAutoscaler"] if name == "policy" else ["ScaledObject"]), (name, kinds)


def _consume_calls() -> dict[str, tuple[str, list[str]]]:
    """{service: (group, roles)} from each main.py's rt.consume(group, roles, ...)."""
    found = {}
    for name in kube.SERVICES:
        path = kube.REPO / "services" / name / "main.py"
        module = importlib.import_module(f"services.{name}.main")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "consume":
                group = ast.literal_eval(node.args[0])
                roles_node = node.args[1]
                roles = list(getattr(module, roles_node.id)) if isinstance(roles_node, ast.Name) \
                    else list(ast.literal_eval(roles_node))
                assert name not in found, f"{path}: one consumer per service expected"
                found[name] = (group, roles)
    return found


def test_service_facts_in_the_chart_match_the_code() -> None:
    template = (kube.CHART / "templates" / "_helpers.tpl").read_text()
    block = template.split('define "aios.serviceFacts" -}}', 1)[1].split("{{- end -}}", 1)[0]
    facts = yaml.safe_load(block)
    code = _consume_calls()
    for name in kube.SERVICES:
        group, roles = code.get(name, ("", []))
        assert facts[name] == {"group": group, "roles": roles}, f"{name}: chart {facts[name]}, code {group} {roles}"


def test_keda_watches_the_groups_and_topics_the_code_consumes() -> None:
    values = kube.presets()["production"]
    prefix = values["kafka"]["topicPrefix"]
    catalog = Catalog(prefix)
    docs = kube.render_preset("production")
    for name, (group, roles) in _consume_calls().items():
        so = kube.find(docs, "ScaledObject", f"{kube.RELEASE}-aios-mesh-{name}")
        triggers = so["spec"]["triggers"]
        # ServiceRuntime.consume: group id = topic prefix + group.
        assert {t["metadata"]["consumerGroup"] for t in triggers} == {prefix + group}
        assert sorted(t["metadata"]["topic"] for t in triggers) == sorted(catalog.topic(r) for r in roles)
        assert all(t["authenticationRef"]["name"] == values["keda"]["authenticationRef"] for t in triggers)


def test_chart_catalog_copy_matches_schemas_catalog() -> None:
    """Helm reads only files inside the chart: files/catalog.yaml must stay a copy of schemas/catalog.yaml
    (fix: cp schemas/catalog.yaml charts/aios-mesh/files/catalog.yaml)."""
    assert (kube.CHART / "files" / "catalog.yaml").read_text() == (kube.REPO / "schemas" / "catalog.yaml").read_text()


def test_service_addresses_point_at_the_services() -> None:
    docs = kube.render_preset("default")
    config = kube.find(docs, "ConfigMap", f"{kube.RELEASE}-aios-mesh-config")["data"]
    for name in kube.SERVICES:
        svc = kube.find(docs, "Service", f"{kube.RELEASE}-aios-mesh-{name}")
        grpc = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc")
        assert config[f"AIOS_{name.upper()}_ADDR"] == f"{svc['metadata']['name']}.{kube.NAMESPACE}.svc:{grpc}"
    ray = kube.find(docs, "RayService", f"{kube.RELEASE}-aios-mesh-inference")
    # KubeRay names the Serve Service <rayservice>-serve-svc.
    assert config["AIOS_INFERENCE_URL"] == f"http://{ray['metadata']['name']}-serve-svc.{kube.NAMESPACE}.svc:8000"


def test_monitors_select_what_exposes_metrics() -> None:
    docs = kube.render_preset("production")
    sm = kube.by_kind(docs, "ServiceMonitor")[0]
    services = [s for s in kube.by_kind(docs, "Service") if kube.selector_matches(sm["spec"]["selector"],
                                                                                  s["metadata"]["labels"])]
    assert {s["metadata"]["labels"]["app.kubernetes.io/component"] for s in services} == set(kube.SERVICES)
    assert all(any(p["name"] == sm["spec"]["endpoints"][0]["port"] for p in s["spec"]["ports"]) for s in services)
    pm = kube.by_kind(docs, "PodMonitor")[0]
    ray_pods = [t for t in _templates(docs) if kube.selector_matches(pm["spec"]["selector"], t.labels)]
    assert len(ray_pods) == 3 and all(t.owner.startswith("RayService/") for t in ray_pods)
    assert all(pm["spec"]["podMetricsEndpoints"][0]["port"] in _ports(t) for t in ray_pods)


def test_dashboards_render_one_configmap_per_file(tmp_path: Path) -> None:
    import shutil

    from helm_python import Chart

    copy = tmp_path / "aios-mesh"
    shutil.copytree(kube.CHART, copy)
    for generated in (copy / "files" / "dashboards").glob("*.json"):
        generated.unlink()  # the committed dashboards; this test brings its own two
    for name in ("runs", "inference"):
        (copy / "files" / "dashboards" / f"{name}.json").write_text(json.dumps({"title": name, "panels": []}))
    values = kube.with_auth({"monitoring": {"dashboards": {"enabled": True, "label": "grafana_dashboard",
                                                        "labelValue": "1"}}})
    docs = kube.documents(kube.render_raw(values, Chart.load(str(copy))))
    maps = [d for d in kube.by_kind(docs, "ConfigMap") if "dashboard" in d["metadata"]["name"]]
    assert sorted(m["metadata"]["name"] for m in maps) == [f"{kube.RELEASE}-aios-mesh-dashboard-inference",
                                                          f"{kube.RELEASE}-aios-mesh-dashboard-runs"]
    assert all(m["metadata"]["labels"]["grafana_dashboard"] == "1" for m in maps)
    assert '"title": "runs"' in next(m for m in maps if m["metadata"]["name"].endswith("runs"))["data"]["runs.json"]


def test_prometheus_rule_carries_every_rules_file() -> None:
    docs = kube.render_preset("production")
    groups = kube.by_kind(docs, "PrometheusRule")[0]["spec"]["groups"]
    expected = [g["name"] for p in sorted((kube.CHART / "files" / "rules").glob("*.yaml"))
                for g in yaml.safe_load(p.read_text())["groups"]]
    assert [g["name"] for g in groups] == expected and expected


def _serve_deployment_classes() -> set[str]:
    tree = ast.parse((kube.REPO / "services" / "inference" / "app.py").read_text())
    return {n.name for n in tree.body if isinstance(n, ast.ClassDef)
            and any("deployment" in ast.unparse(d) for d in n.decorator_list)}


@pytest.mark.parametrize("preset", ["default", "gpu"])
def test_ray_service_tiers_are_pinned_to_their_worker_groups(preset: str) -> None:
    docs = kube.render_preset(preset)
    ray = kube.by_kind(docs, "RayService")[0]
    cluster = ray["spec"]["rayClusterConfig"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"low-latency", "high-throughput"}
    assert groups["low-latency"]["minReplicas"] >= 1, "the low-latency tier must stay warm"
    assert cluster["enableInTreeAutoscaling"] is True
    assert groups["high-throughput"]["maxReplicas"] > groups["high-throughput"]["minReplicas"]
    offered = {name: yaml.safe_load(yaml.safe_load(g["rayStartParams"]["resources"])) for name, g in groups.items()}
    serve = yaml.safe_load(ray["spec"]["serveConfigV2"])
    app = serve["applications"][0]
    deployments = {d["name"]: d for d in app["deployments"]}
    assert set(deployments) <= _serve_deployment_classes(), "Serve config names a deployment app.py lacks"
    tiers = {"LowLatencyEncoder": "low-latency", "HighThroughputEncoder": "high-throughput"}
    for deployment, group in tiers.items():
        wanted = deployments[deployment]["ray_actor_options"]["resources"]
        assert set(wanted) <= set(offered[group]), (deployment, wanted, offered[group])
        others = [g for g in offered if g != group]
        assert not any(set(wanted) & set(offered[g]) for g in others), f"{deployment} could land on {others}"
    gpus = groups["high-throughput"]["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
    if preset == "gpu":
        assert gpus == 1 and deployments["HighThroughputEncoder"]["ray_actor_options"]["num_gpus"] == 1
        assert groups["high-throughput"]["template"]["spec"]["tolerations"]
        assert groups["high-throughput"]["template"]["spec"]["nodeSelector"]
    else:
        assert gpus is None


def test_topics_job_runs_a_module_that_exists() -> None:
    job = kube.find(kube.render_preset("default"), "Job", f"{kube.RELEASE}-aios-mesh-topics")
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:2] == ["python", "-m"]
    assert (kube.REPO / (command[2].replace(".", "/") + ".py")).exists(), command
    assert "pre-install" in job["metadata"]["annotations"]["helm.sh/hook"]
