"""Every pod meets the restricted Pod Security Standard (and the chart's own
hardening on top), and no secret value can land in a ConfigMap."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.chart import kube

pytestmark = pytest.mark.timeout(120)
PRESETS = sorted(kube.presets())
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|API_KEY|CREDENTIAL|(^|_)TOKEN($|_)", re.I)


def containers(docs: list[dict[str, Any]], t: kube.PodTemplate) -> list[tuple[str, dict[str, Any]]]:
    found = [(c["name"], c) for key in ("initContainers", "containers", "ephemeralContainers")
             for c in t.spec.get(key, [])]
    if t.owner.endswith(":head"):  # KubeRay injects its autoscaler sidecar with these options
        ray = kube.find(docs, "RayService", t.owner.split("/")[1].split(":")[0])
        options = ray["spec"]["rayClusterConfig"].get("autoscalerOptions")
        if ray["spec"]["rayClusterConfig"].get("enableInTreeAutoscaling"):
            found.append(("autoscaler", options))
    return found


def restricted_violations(docs: list[dict[str, Any]], t: kube.PodTemplate) -> list[str]:
    """The checks of the restricted profile (Kubernetes Pod Security Standards, latest)."""
    spec, pod_sc, bad = t.spec, t.spec.get("securityContext", {}), []
    for field in ("hostNetwork", "hostPID", "hostIPC", "hostUsers"):
        if spec.get(field) and field != "hostUsers":
            bad.append(f"{field} is set")
    for sysctl in pod_sc.get("sysctls", []):
        if sysctl["name"] not in SAFE_SYSCTLS:
            bad.append(f"unsafe sysctl {sysctl['name']}")
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            bad.append(f"volume {volume['name']} of type {kinds - RESTRICTED_VOLUMES}")
    if pod_sc.get("runAsUser") == 0:
        bad.append("pod runAsUser 0")
    for name, c in containers(docs, t):
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            bad.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{name}: allowPrivilegeEscalation is not false")
        if not (sc.get("runAsNonRoot") is True or (pod_sc.get("runAsNonRoot") is True and
                                                    sc.get("runAsNonRoot") is not False)):
            bad.append(f"{name}: runAsNonRoot is not true")
        if sc.get("runAsUser") == 0:
            bad.append(f"{name}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{name}: seccompProfile {seccomp}")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            bad.append(f"{name}: capabilities do not drop ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            bad.append(f"{name}: adds capabilities {caps['add']}")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            bad.append(f"{name}: hostPort")
        if sc.get("procMount", "Default") != "Default":
            bad.append(f"{name}: procMount")
        se = sc.get("seLinuxOptions") or {}
        if se.get("user") or se.get("role") or se.get("type", "") not in ("", "container_t", "container_init_t",
                                                                              "container_kvm_t", "container_engine_t"):
            bad.append(f"{name}: seLinuxOptions")
    return bad


@pytest.mark.parametrize("preset", PRESETS)
def test_every_pod_meets_the_restricted_pod_security_standard(preset: str) -> None:
    docs = kube.render_preset(preset)
    templates = list(kube.pod_templates(docs))
    assert templates
    problems = {t.owner: v for t in templates if (v := restricted_violations(docs, t))}
    assert not problems, problems


@pytest.mark.parametrize("preset", PRESETS)
def test_every_pod_is_hardened_beyond_the_standard(preset: str) -> None:
    """Read-only root with a writable /tmp emptyDir, no service-account token in the app containers,
    resources on every container."""
    docs = kube.render_preset(preset)
    for t in kube.pod_templates(docs):
        assert t.spec.get("automountServiceAccountToken") is False, t.owner
        empty_dirs = {v["name"] for v in t.spec.get("volumes", []) if "emptyDir" in v}
        for name, c in containers(docs, t):
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, (t.owner, name)
            assert c.get("resources", {}).get("requests"), (t.owner, name)
            tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            assert tmp and tmp[0]["name"] in empty_dirs, (t.owner, name)
            token = [m for m in c.get("volumeMounts", []) if "serviceaccount" in m["mountPath"]]
            assert not token or name == "autoscaler", f"{t.owner} {name} mounts a service-account token"


def test_restricted_check_can_fail() -> None:
    docs = kube.render(kube.with_auth({"containerSecurityContext": {
        "allowPrivilegeEscalation": True, "readOnlyRootFilesystem": True,
        "capabilities": {"drop": [], "add": ["NET_ADMIN"]}}}))
    t = next(kube.pod_templates(docs))
    problems = " ".join(restricted_violations(docs, t))
    assert "allowPrivilegeEscalation" in problems and "drop ALL" in problems and "NET_ADMIN" in problems


def _urls_with_credentials(text: str) -> list[str]:
    return [u for u in re.findall(r"[a-z][a-z0-9+.-]*://\S+", text) if urlsplit(u).password or urlsplit(u).username]


@pytest.mark.parametrize("preset", PRESETS)
def test_no_secret_lands_in_a_config_map_or_a_literal_env(preset: str) -> None:
    docs = kube.render_preset(preset)
    assert not kube.by_kind(docs, "Secret"), "the chart never generates Secrets"
    for cm in kube.by_kind(docs, "ConfigMap"):
        for key, value in (cm.get("data") or {}).items():
            assert not SECRET_NAME.search(key), f"ConfigMap {cm['metadata']['name']} holds {key}"
            assert not _urls_with_credentials(str(value)), f"ConfigMap {cm['metadata']['name']}: {key}"
    for t in kube.pod_templates(docs):
        for name, c in containers(docs, t):
            for var in (c or {}).get("env", []) or []:
                if var["name"].endswith("_FILE") and "value" in var:
                    # A path, not a secret: AIOS_TOKEN_FILE must name a file of a mounted Secret.
                    if SECRET_NAME.search(var["name"]):
                        assert _in_secret_mount(t, c, var["value"]), \
                            f"{t.owner} {name}: {var['name']}={var['value']} is not inside a Secret volume"
                elif SECRET_NAME.search(var["name"]) or var["name"] == "AIOS_REDIS_URL" and "value" not in var:
                    assert "secretKeyRef" in var.get("valueFrom", {}), f"{t.owner} {name}: {var['name']} literal"
                if "value" in var:
                    assert not _urls_with_credentials(str(var["value"])), f"{t.owner} {name}: {var['name']}"


def _in_secret_mount(t: kube.PodTemplate, container: dict[str, Any], path: str) -> bool:
    """``path`` lies in a mount whose volume holds Secrets only (a secret, or a projected volume of secrets)."""
    volumes = {v["name"]: v for v in t.spec.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        if path.startswith(mount["mountPath"].rstrip("/") + "/"):
            volume = volumes[mount["name"]]
            sources = volume["projected"]["sources"] if "projected" in volume else [volume]
            return all(set(s) - {"name"} == {"secret"} for s in sources)
    return False


def test_secrets_come_from_the_named_existing_secrets() -> None:
    docs = kube.render_preset("production")
    values = kube.presets()["production"]
    config = kube.find(docs, "ConfigMap", f"{kube.RELEASE}-aios-mesh-config")["data"]
    assert "AIOS_REDIS_URL" not in config and "AIOS_KAFKA_SASL_PASSWORD" not in config
    expected = {"AIOS_REDIS_URL": (values["redis"]["existingSecret"], values["redis"]["urlKey"]),
                "AIOS_KAFKA_SASL_PASSWORD": (values["kafka"]["sasl"]["existingSecret"],
                                             values["kafka"]["sasl"]["passwordKey"])}
    for t in kube.pod_templates(docs):
        if t.owner.startswith("RayService/"):
            continue
        env = {v["name"]: v for v in t.spec["containers"][0]["env"]}
        for name, (secret, key) in expected.items():
            assert env[name]["valueFrom"]["secretKeyRef"] == {"name": secret, "key": key}, (t.owner, name)
    executor = next(t for t in kube.pod_templates(docs) if t.owner.endswith("-executor"))
    api_key = next(v for v in executor.spec["containers"][0]["env"] if v["name"] == "AIOS_EXECUTOR_GENERATOR_API_KEY")
    assert api_key["valueFrom"]["secretKeyRef"]["name"] == "aios-generator"
