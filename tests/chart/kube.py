"""Rendering the chart in-process and walking what it renders: shared by the
chart tests and by ``python -m tests.chart.golden --write``."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from helm_python import Chart

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "aios-mesh"
CRD_DIR = REPO / "tests" / "data" / "crds"
CHART_CRD_DIR = Path(__file__).resolve().parent / "crds"  # operators' CRDs vendored by the chart's own tests
PREVIOUS_VALUES = Path(__file__).resolve().parent / "previous"
RELEASE = "aios"
NAMESPACE = "aios-system"
SERVICES = ("planner", "executor", "memory", "policy", "observability")
# Fast C loader when PyYAML has it: the RayService CRD alone is 1 MB.
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def presets() -> dict[str, dict[str, Any]]:
    """Every ci/*-values.yaml by name (`production` for ci/production-values.yaml)."""
    found = {}
    for path in sorted((CHART / "ci").glob("*-values.yaml")):
        found[path.name.removesuffix("-values.yaml")] = yaml.load(path.read_text(), Loader=Loader) or {}
    return found


# What a values file needs since gRPC authentication (chart 0.3.0): the credential Secret and the token
# issuer (UPGRADING.md, "0.2.0 -> 0.3.0"). Tests that render ad-hoc values start from it.
AUTH: dict[str, Any] = {"auth": {"existingSecret": "aios-grpc", "issuer": "https://id.example.com"}}


def with_auth(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with AUTH merged under them (values win)."""
    merged = copy.deepcopy(values)
    merged["auth"] = {**AUTH["auth"], **merged.get("auth", {})}
    return merged


def previous_values() -> dict[str, dict[str, Any]]:
    """Values files of earlier chart releases with the upgrade steps UPGRADING.md asks for (AUTH),
    which must keep rendering."""
    return {p.stem: with_auth(yaml.load(p.read_text(), Loader=Loader) or {})
            for p in sorted(PREVIOUS_VALUES.glob("*.yaml"))}


@functools.lru_cache(maxsize=1)
def chart() -> Chart:
    return Chart.load(str(CHART))


def render_raw(values: dict[str, Any], chart_obj: Chart | None = None) -> dict[str, str]:
    """{template path: rendered text}; raises the Helm error for bad values."""
    return (chart_obj or chart()).render(copy.deepcopy(values), name=RELEASE, namespace=NAMESPACE, is_install=True)


def documents(rendered: dict[str, str]) -> list[dict[str, Any]]:
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.load_all(text, Loader=Loader):
            if doc:
                doc.setdefault("metadata", {}).setdefault("annotations", {})
                docs.append(doc)
    return docs


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    return documents(render_raw(values))


@functools.lru_cache(maxsize=16)
def _render_preset(name: str) -> tuple[dict[str, Any], ...]:
    source = presets() | previous_values()
    return tuple(render(source[name]))


def render_preset(name: str) -> list[dict[str, Any]]:
    """A preset's objects (cached; callers get their own copy)."""
    return copy.deepcopy(list(_render_preset(name)))


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


@dataclass
class PodTemplate:
    """A pod the cluster will run, wherever its template sits."""

    owner: str  # "StatefulSet/aios-aios-mesh-planner", "RayService/...:worker low-latency"
    labels: dict[str, str]
    spec: dict[str, Any]
    hook: str = ""  # helm.sh/hook of the owner, if any


def pod_templates(docs: list[dict[str, Any]]) -> Iterator[PodTemplate]:
    for d in docs:
        kind, name = d["kind"], d["metadata"]["name"]
        hook = d["metadata"]["annotations"].get("helm.sh/hook", "")
        if kind in ("Deployment", "StatefulSet", "Job"):
            tpl = d["spec"]["template"]
            yield PodTemplate(f"{kind}/{name}", tpl["metadata"].get("labels", {}), tpl["spec"], hook)
        elif kind == "Pod":
            yield PodTemplate(f"Pod/{name}", d["metadata"].get("labels", {}), d["spec"], hook)
        elif kind == "RayService":
            cluster = d["spec"]["rayClusterConfig"]
            head = cluster["headGroupSpec"]["template"]
            yield PodTemplate(f"RayService/{name}:head", head["metadata"].get("labels", {}), head["spec"])
            for group in cluster.get("workerGroupSpecs", []):
                tpl = group["template"]
                yield PodTemplate(f"RayService/{name}:worker {group['groupName']}",
                                  tpl["metadata"].get("labels", {}), tpl["spec"])


def selector_matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels and matchExpressions) against a label set."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def container_env(docs: list[dict[str, Any]], template: PodTemplate, container: dict[str, Any],
                  secrets: dict[tuple[str, str], str]) -> dict[str, str]:
    """The environment the kubelet would give ``container``: envFrom ConfigMaps
    first, then env; secretKeyRefs resolve from ``secrets`` ({(name, key): value}),
    a fieldRef to metadata.name gives a StatefulSet-style pod name."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        assert ref, f"{template.owner}: only configMapRef envFrom is expected, got {source}"
        env.update({k: str(v) for k, v in find(docs, "ConfigMap", ref["name"])["data"].items()})
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
            continue
        source = var["valueFrom"]
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            env[var["name"]] = secrets[(ref["name"], ref["key"])]
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            env[var["name"]] = str(find(docs, "ConfigMap", ref["name"])["data"][ref["key"]])
        elif source.get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[var["name"]] = template.owner.split("/", 1)[1] + "-0"
        else:
            raise AssertionError(f"{template.owner}: unexpected env source {var}")
    return env


def _volume_files(docs: list[dict[str, Any]], owner: str, source: dict[str, Any],
                  secret_file: Callable[[str, str], bytes]) -> dict[str, bytes]:
    """{path in the volume: content} of one secret or configMap volume (source). A ConfigMap the chart
    renders gives its data, and must hold every key the volume names; one it does not render (an
    existing one the values name) and a Secret give placeholder content from ``secret_file``."""
    if "configMap" in source:
        ref = source["configMap"]
        rendered = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == ref["name"]]
        data = {k: str(v).encode() for k, v in (rendered[0].get("data") or {}).items()} if rendered else None
        items = ref.get("items") or [{"key": k, "path": k} for k in (data or {})]
        files = {}
        for item in items:
            if data is None:
                files[item["path"]] = secret_file(ref["name"], item["key"])
            else:
                assert item["key"] in data, f"{owner}: ConfigMap {ref['name']} has no key {item['key']}"
                files[item["path"]] = data[item["key"]]
        return files
    ref = source["secret"]
    return {item["path"]: secret_file(ref.get("secretName") or ref["name"], item["key"])
            for item in ref.get("items") or []}


def materialize(docs: list[dict[str, Any]], template: PodTemplate, container: dict[str, Any], root: Path,
                secret_file: Callable[[str, str], bytes]) -> dict[str, Path]:
    """Lay out the files the kubelet would mount into ``container`` under ``root``, one directory per
    mount: {mountPath: local directory}. ``secret_file(secret, key)`` gives a Secret key's content."""
    volumes = {v["name"]: v for v in template.spec.get("volumes", [])}
    mounts: dict[str, Path] = {}
    for i, mount in enumerate(container.get("volumeMounts", [])):
        volume = volumes.get(mount["name"])
        assert volume is not None, f"{template.owner}: mount {mount['name']} names no volume"
        local = root / f"{i}-{mount['name']}"
        local.mkdir(parents=True, exist_ok=True)
        files: dict[str, bytes] = {}
        if "projected" in volume:
            for source in volume["projected"]["sources"]:
                overlap = set(files) & set(new := _volume_files(docs, template.owner, source, secret_file))
                assert not overlap, f"{template.owner}: volume {mount['name']} projects {overlap} twice"
                files.update(new)
        elif "configMap" in volume or "secret" in volume:
            files = _volume_files(docs, template.owner, volume, secret_file)
        for path, content in files.items():
            (local / path).parent.mkdir(parents=True, exist_ok=True)
            (local / path).write_bytes(content)
        mounts[mount["mountPath"]] = local
    return mounts


def localize(env: dict[str, str], mounts: dict[str, Path]) -> dict[str, str]:
    """``env`` with every path inside a mount pointing at its local copy (see ``materialize``)."""
    out = {}
    for name, value in env.items():
        for mount_path, local in mounts.items():
            if value.startswith(mount_path.rstrip("/") + "/"):
                value = str(local) + value[len(mount_path.rstrip("/")):]
                break
        out[name] = value
    return out
