"""Every preset renders, lints strict for three Kubernetes versions, and every
object it renders passes its schema: kubernetes-validate (strict) for built-in
kinds, the vendored upstream CRD for the operators' kinds."""

from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from helm_python import lint

from tests.chart import kube

pytestmark = pytest.mark.timeout(120)

PRESETS = sorted(kube.presets())
# The oldest version the chart supports (Chart.yaml kubeVersion), a middle
# one, and the newest the validator ships schemas for.
KUBE_VERSIONS = ("1.27.0", "1.30.0", kubernetes_validate.latest_version())
CRD_FILES = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): kube.CRD_DIR / "crd-servicemonitors.yaml",
    ("monitoring.coreos.com/v1", "PodMonitor"): kube.CRD_DIR / "crd-podmonitors.yaml",
    ("monitoring.coreos.com/v1", "PrometheusRule"): kube.CRD_DIR / "crd-prometheusrules.yaml",
    ("keda.sh/v1alpha1", "ScaledObject"): kube.CRD_DIR / "crd-scaledobjects.yaml",
    ("ray.io/v1", "RayService"): kube.CRD_DIR / "ray.io_rayservices.yaml",
    # Vendored next to the chart's tests (tests/chart/crds/SOURCES.md), the same way.
    ("cert-manager.io/v1", "Certificate"): kube.CHART_CRD_DIR / "crd-certificates.yaml",
}


def test_presets_exist() -> None:
    assert {"default", "minimal", "production", "gpu"} <= set(PRESETS), PRESETS


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_renders(preset: str) -> None:
    kinds = {d["kind"] for d in kube.render_preset(preset)}
    assert {"ConfigMap", "StatefulSet", "Deployment", "Service"} <= kinds, kinds


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_lints_strict(preset: str, version: str) -> None:
    report = lint(str(kube.CHART), kube.presets()[preset], strict=True, kube_version=f"v{version}",
                  namespace=kube.NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not problems, problems


def test_lint_reports_a_broken_value() -> None:
    """The lint check above can fail: a value the schema refuses is an error."""
    report = lint(str(kube.CHART), {"kafka": {"securityProtocol": "TLS"}}, strict=True, kube_version="v1.30.0")
    assert [m for m in report["messages"] if m["severity"] >= 2] or report["errors"]


def _is_custom(doc: dict[str, Any]) -> bool:
    return (doc["apiVersion"], doc["kind"]) in CRD_FILES


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("preset", PRESETS)
def test_builtin_objects_pass_kubernetes_validate_strict(preset: str, version: str) -> None:
    for doc in kube.render_preset(preset):
        if _is_custom(doc):
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(f"{doc['apiVersion']} {doc['kind']} is neither built into Kubernetes {version} "
                        "nor one of the vendored CRDs")
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} on {version}: {exc.message} at "
                        f"{'/'.join(str(p) for p in exc.path)}")


def close_properties(schema: Any) -> Any:
    """kubeconform's strict mode: an object schema that lists properties admits no others,
    unless Kubernetes says its fields are free-form."""
    if isinstance(schema, dict):
        out = {k: close_properties(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out and \
                not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [close_properties(v) for v in schema]
    return schema


@functools.cache
def crd_validator(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    crd = yaml.load(CRD_FILES[(api_version, kind)].read_text(), Loader=kube.Loader)
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind
    served = [v for v in crd["spec"]["versions"] if v["name"] == version and v.get("served")]
    assert served, f"{kind}: version {version} is not served by the vendored CRD"
    schema = close_properties(served[0]["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


def custom_objects() -> list[tuple[str, dict[str, Any]]]:
    seen: dict[str, tuple[str, dict[str, Any]]] = {}
    for preset in PRESETS:
        for doc in kube.render_preset(preset):
            if _is_custom(doc):
                seen.setdefault(f"{preset}:{doc['kind']}/{doc['metadata']['name']}", (preset, doc))
    return [seen[k] for k in sorted(seen)]


def test_every_operator_kind_is_rendered_by_some_preset() -> None:
    kinds = {doc["kind"] for _p, doc in custom_objects()}
    assert kinds == {kind for _v, kind in CRD_FILES}, kinds


@pytest.mark.parametrize(("preset", "doc"), custom_objects(),
                         ids=[f"{p}-{d['kind']}-{d['metadata']['name']}" for p, d in custom_objects()])
def test_custom_objects_pass_their_upstream_crd(preset: str, doc: dict[str, Any]) -> None:
    errors = sorted(crd_validator(doc["apiVersion"], doc["kind"]).iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(str(p) for p in e.path)}: {e.message}" for e in errors[:10])


def test_crd_check_can_fail() -> None:
    """Closing the properties catches a misspelt field the open schema would let through."""
    doc = next(d for _p, d in custom_objects() if d["kind"] == "ScaledObject")
    doc = {**doc, "spec": {**doc["spec"], "maxReplicas": 3}}
    assert list(crd_validator(doc["apiVersion"], doc["kind"]).iter_errors(doc))


@pytest.mark.parametrize("crd_dir", [kube.CRD_DIR, kube.CHART_CRD_DIR], ids=["tests-data", "tests-chart"])
def test_vendored_crds_match_their_recorded_hashes(crd_dir: Path) -> None:
    sources = (crd_dir / "SOURCES.md").read_text()
    recorded = dict((name, digest) for digest, name in re.findall(r"^([0-9a-f]{64})  (\S+)$", sources, re.M))
    assert set(recorded) == {p.name for p in crd_dir.glob("*.yaml")}
    for name, digest in recorded.items():
        assert hashlib.sha256((crd_dir / name).read_bytes()).hexdigest() == digest, name
    assert (crd_dir / "LICENSE").read_text().startswith("\n                                 Apache License") \
        or "Apache License" in (crd_dir / "LICENSE").read_text()[:200]


@pytest.mark.parametrize("release", sorted(kube.previous_values()))
def test_previous_release_values_still_render(release: str) -> None:
    docs = kube.render_preset(release)
    for doc in docs:
        if not _is_custom(doc):
            kubernetes_validate.validate(doc, KUBE_VERSIONS[-1], strict=True)
    config = kube.find(docs, "ConfigMap", f"{kube.RELEASE}-aios-mesh-config")["data"]
    old = kube.previous_values()[release]
    assert config["AIOS_KAFKA_BOOTSTRAP"] == old["kafka"]["bootstrap"]
    assert config["AIOS_REDIS_URL"] == old["redis"]["url"]
    assert config["AIOS_INFERENCE_URL"] == old["inference"]["url"]
