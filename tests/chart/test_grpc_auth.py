"""gRPC authentication in the chart: what each pod mounts is what the code needs to serve and call
over (mutual) TLS, the Cedar policies are the repository's, and the exec probe that replaces the
kubelet's plaintext gRPC probe really passes against a TLS server built from a rendered pod, and
really fails when it should.

Credentials here are made by the embedded stack's PKI (services/common/pki.py) in a temporary
directory for each test: nothing is committed."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from helm_python import HelmError

from services.common import authz
from services.common.auth import ClientAuth, ServerAuth
from services.common.pki import EmbeddedPki, Identity
from services.common.settings import GrpcAuthSettings, MeshSettings
from tests.chart import kube

pytestmark = pytest.mark.timeout(120)
ISSUER = "https://id.example.com"
SERVICE_ROLES = {"planner": ("policy-client",), "executor": ("memory-client",)}


def refusal(values: dict[str, Any]) -> str:
    with pytest.raises(HelmError) as info:
        kube.render_raw(values)
    return str(info.value)


def services(docs: list[dict[str, Any]]) -> dict[str, kube.PodTemplate]:
    return {t.spec["containers"][0]["name"]: t for t in kube.pod_templates(docs)
            if t.owner.startswith(("StatefulSet/", "Deployment/"))}


def test_chart_authz_copy_matches_policies() -> None:
    """Helm reads only files inside the chart: files/authz/ must stay a copy of policies/ (fix:
    cp policies/authz.cedar policies/authz.cedarschema charts/aios-mesh/files/authz/)."""
    for name in ("authz.cedar", "authz.cedarschema"):
        source = (kube.REPO / "policies" / name).read_bytes()
        assert (kube.CHART / "files" / "authz" / name).read_bytes() == source, f"files/authz/{name} drifted"
        data = kube.find(kube.render_preset("default"), "ConfigMap", f"{kube.RELEASE}-aios-mesh-authz")["data"]
        assert data[name].encode() == source, f"the rendered ConfigMap's {name} differs from policies/{name}"


def test_rendered_policies_validate_and_decide(tmp_path: Path) -> None:
    """The mounted copy loads as the services load it (parsed and validated against the schema)."""
    data = kube.find(kube.render_preset("default"), "ConfigMap", f"{kube.RELEASE}-aios-mesh-authz")["data"]
    for name, text in data.items():
        (tmp_path / name).write_text(text)
    from services.common.auth import Principal

    authorizer = authz.Authorizer(tmp_path / "authz.cedar", tmp_path / "authz.cedarschema", reload_s=0)
    planner = Principal(kind="service", name="planner", tenants=frozenset({"*"}), roles=frozenset({"policy-client"}))
    assert authorizer.decide(planner, "EvaluatePolicy", authz.Resource("Tenant", "acme", {"tenant": "acme"})).allowed
    assert not authorizer.decide(planner, "ApproveStep", authz.Resource("Run", "r1", {"tenant": "acme"}),
                                 {"gate_role": "finance"}).allowed


# -- what each pod mounts and sets ------------------------------------------------------------------
@pytest.mark.parametrize("preset", sorted(kube.presets()))
def test_every_service_mounts_what_its_mode_needs(preset: str) -> None:
    values = kube.presets()[preset]
    mode = values.get("auth", {}).get("mode", "mtls")
    docs = kube.render_preset(preset)
    for name, t in services(docs).items():
        container = t.spec["containers"][0]
        env = {v["name"]: v.get("value") for v in container["env"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert env["AIOS_GRPC_AUTH"] == mode, t.owner
        if mode == "none":
            assert not {"/etc/aios/grpc", "/etc/aios/authz", "/etc/aios/probe"} & set(mounts), t.owner
            assert not any(k.startswith(("AIOS_GRPC_TLS_", "AIOS_TOKEN", "AIOS_AUTH")) for k in env), t.owner
            continue
        volume = next(v for v in t.spec["volumes"] if v["name"] == mounts["/etc/aios/grpc"])
        secrets = {s["secret"]["name"] for s in volume["projected"]["sources"]}
        wanted = {values["auth"].get("serviceSecrets", {}).get(name) or values["auth"]["existingSecret"]}
        if values["auth"].get("certManager", {}).get("enabled"):
            wanted.add(_certificate(docs, name)["spec"]["secretName"])
        assert secrets == wanted, f"{t.owner} mounts {secrets}, not its own credential {wanted}"
        for var, file in (("AIOS_GRPC_TLS_CA_FILE", "ca.crt"), ("AIOS_GRPC_TLS_CERT_FILE", "tls.crt"),
                          ("AIOS_GRPC_TLS_KEY_FILE", "tls.key"), ("AIOS_TOKEN_FILE", "token"),
                          ("AIOS_AUTH_JWKS_FILE", "jwks.json")):
            assert env[var] == f"/etc/aios/grpc/{file}", (t.owner, var)
        assert env["AIOS_AUTHZ_POLICY_FILE"].startswith("/etc/aios/authz/"), t.owner
        assert env["AIOS_AUTH_ISSUER"] == values["auth"]["issuer"], t.owner
    kinds = {d["metadata"]["name"] for d in kube.by_kind(docs, "ConfigMap")}
    assert (f"{kube.RELEASE}-aios-mesh-grpc-probe" in kinds) is (mode != "none")


def _certificate(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return kube.find(docs, "Certificate", f"{kube.RELEASE}-aios-mesh-{name}-grpc")


def test_cert_manager_issues_each_identity_the_names_it_is_checked_against() -> None:
    """CN = the service's name (a service token is bound to it); DNS names include the one the other
    services dial; the pod mounts that Certificate's Secret for its certificate, key and CA."""
    docs = kube.render_preset("production")
    config = kube.find(docs, "ConfigMap", f"{kube.RELEASE}-aios-mesh-config")["data"]
    for name, t in services(docs).items():
        spec = _certificate(docs, name)["spec"]
        assert spec["commonName"] == name
        assert config[f"AIOS_{name.upper()}_ADDR"].rsplit(":", 1)[0] in spec["dnsNames"]
        assert {"server auth", "client auth"} <= set(spec["usages"])
        volume = next(v for v in t.spec["volumes"] if v["name"] == "grpc-credentials")
        tls = next(s["secret"] for s in volume["projected"]["sources"] if s["secret"]["name"] == spec["secretName"])
        assert {i["path"] for i in tls["items"]} == {"tls.crt", "tls.key", "ca.crt"}
    cli = _certificate(docs, "cli")["spec"]
    assert cli["usages"] == ["digital signature", "client auth"] and "dnsNames" not in cli
    pod = next(t for t in kube.pod_templates(docs) if t.owner.endswith("-test-status"))
    volume = next(v for v in pod.spec["volumes"] if v["name"] == "grpc-credentials")
    assert [s["secret"]["name"] for s in volume["projected"]["sources"]] == [cli["secretName"]]


def test_keys_are_mapped_to_the_files_the_settings_name() -> None:
    docs = kube.render_preset("minimal")
    t = services(docs)["memory"]
    volume = next(v for v in t.spec["volumes"] if v["name"] == "grpc-credentials")
    items = {i["key"]: i["path"] for i in volume["projected"]["sources"][0]["secret"]["items"]}
    assert items == {"cert.pem": "tls.crt", "key.pem": "tls.key", "ca.pem": "ca.crt", "access-token": "token",
                     "jwks": "jwks.json"}


# -- credentials from a rendered pod serve and call ---------------------------------------------------
class Credentials:
    """A mesh CA, one certificate and token per identity, the issuer's JWKS: the Secrets' content."""

    def __init__(self, root: Path, hosts: dict[str, str], issuer: str = ISSUER) -> None:
        self.pki = EmbeddedPki(root, issuer=issuer)
        self.pki.ensure([])
        self.hosts = hosts  # identity -> the DNS name its certificate carries

    def identity(self, name: str) -> Identity:
        return Identity(name, "service" if name != "cli" else "user", ("*",), SERVICE_ROLES.get(name, ()))

    def secret_file(self, secret: str, key: str) -> bytes:
        """Secret `<identity>-grpc`, keys as in values.yaml (auth.keys)."""
        name = secret.removesuffix("-grpc")
        if not self.pki.cert_file(name).exists():
            self.pki.issue_certificate(name, hosts=[self.hosts.get(name, name)])
        files = {"tls.crt": self.pki.cert_file(name), "tls.key": self.pki.key_file(name), "ca.crt": self.pki.ca_file,
                 "jwks.json": self.pki.jwks_file}
        if key == "token":
            return self.pki.mint(self.identity(name)).encode()
        return files[key].read_bytes()


def _values(mode: str, ports: dict[str, int] | None = None) -> dict[str, Any]:
    return {"auth": {"mode": mode, "issuer": ISSUER,
                     "serviceSecrets": {n: f"{n}-grpc" for n in kube.SERVICES}, "cli": {"existingSecret": "cli-grpc"}},
            "services": {n: {"grpcPort": p} for n, p in (ports or {}).items()}}


def _pod(docs: list[dict[str, Any]], name: str, creds: Credentials, root: Path) -> tuple[dict[str, Any], dict[str, str],
                                                                                          dict[str, Path]]:
    """(container, environment with local paths, mounts) of the pod that runs ``name`` (or the test pod: "cli")."""
    t = next(t for t in kube.pod_templates(docs) if t.owner.endswith(f"-{name}") or
             (name == "cli" and t.owner.endswith("-test-status")))
    container = t.spec["containers"][0]
    env = kube.container_env(docs, t, container, {})
    mounts = kube.materialize(docs, t, container, root / name, creds.secret_file)
    return container, {k: v for k, v in kube.localize(env, mounts).items() if k.startswith("AIOS_")}, mounts


@pytest.fixture
def aios_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[dict[str, str]], None]]:
    """Replace the process's AIOS_* environment (the settings classes read it)."""
    def use(env: dict[str, str]) -> None:
        for name in list(os.environ):
            if name.startswith("AIOS_"):
                monkeypatch.delenv(name)
        for name, value in env.items():
            monkeypatch.setenv(name, value)

    yield use
    authz.install(None)


@pytest.mark.parametrize("mode", ["mtls", "tls"])
def test_rendered_credentials_serve_and_call(mode: str, tmp_path: Path,
                                             aios_env: Callable[[dict[str, str]], None]) -> None:
    """Every service's rendered env, with the Secrets it names mounted, builds its gRPC server (TLS
    credentials, token verifier, the mounted Cedar policies) and its client; its token verifies with
    the mounted JWKS and names the service its certificate names. The test pod gets a client."""
    docs = kube.render(_values(mode))
    creds = Credentials(tmp_path / "pki", {})
    for name in kube.SERVICES:
        _c, env, _m = _pod(docs, name, creds, tmp_path)
        aios_env(env)
        settings = MeshSettings()
        server = ServerAuth.from_settings(settings)
        assert server.mode == mode and server.credentials is not None
        authz.install(None)
        assert authz.authorizer().policy_file == Path(env["AIOS_AUTHZ_POLICY_FILE"])
        client = ClientAuth.from_settings(settings)
        assert client is not None and client.ca == creds.pki.ca_file.read_bytes()
        principal = server.verifier.verify(client.token())  # type: ignore[union-attr]
        assert principal.id == f"service:{name}"
        from cryptography import x509

        cn = x509.load_pem_x509_certificate(client.cert).subject.rfc4514_string()
        assert f"CN={name}" in cn, f"{name} presents the certificate of {cn}"
    _c, env, _m = _pod(docs, "cli", creds, tmp_path)
    aios_env(env)
    client = ClientAuth.from_settings(GrpcAuthSettings())
    assert client is not None and bool(client.cert) is (mode == "mtls") and not client.token()


def test_dev_preset_serves_plaintext(aios_env: Callable[[dict[str, str]], None]) -> None:
    docs = kube.render_preset("dev")
    for name, t in services(docs).items():
        env = kube.container_env(docs, t, t.spec["containers"][0], {})
        aios_env({k: v for k, v in env.items() if k.startswith("AIOS_")})
        settings = MeshSettings()
        assert ServerAuth.from_settings(settings).credentials is None and ClientAuth.from_settings(settings) is None
        assert t.spec["containers"][0]["readinessProbe"]["grpc"]["port"] > 0, name


# -- the probe ----------------------------------------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    """A gRPC server built from one service's rendered pod (its env, its mounted Secrets and policies) on
    a free loopback port the chart was rendered with, and that pod's readiness probe command."""

    def __init__(self, name: str, mode: str, creds: Credentials, root: Path,
                 aios_env: Callable[[dict[str, str]], None]) -> None:
        from services.common.grpc_server import serve_grpc

        self.port = _free_port()
        docs = kube.render(_values(mode, {name: self.port}))
        container, self.env, mounts = _pod(docs, name, creds, root)
        aios_env(self.env)
        self.server, self.health = serve_grpc(f"127.0.0.1:{self.port}", [], ready=False,
                                              auth=ServerAuth.from_settings(MeshSettings()))
        self.probe = container["readinessProbe"]["exec"]["command"]
        script = kube.localize({"script": self.probe[1]}, mounts)["script"]
        self.command = [sys.executable, script, *self.probe[2:]]

    def run_probe(self, **env: str) -> subprocess.CompletedProcess[str]:
        """The probe as the kubelet runs it: in the container, with the container's environment."""
        base = {k: v for k, v in os.environ.items() if not k.startswith("AIOS_")}
        return subprocess.run(self.command, env={**base, **self.env, **env}, capture_output=True, text=True,
                              timeout=60)

    def serving(self, serving: bool) -> None:
        from services.common.grpc_server import set_serving

        set_serving(self.health, [], serving)


@pytest.fixture
def serve(tmp_path: Path, aios_env: Callable[[dict[str, str]], None]) -> Iterator[Callable[..., Served]]:
    started: list[Served] = []

    def start(name: str, mode: str, hosts: dict[str, str] | None = None) -> Served:
        creds = Credentials(tmp_path / f"pki-{len(started)}",
                            hosts if hosts is not None else {name: f"{kube.RELEASE}-aios-mesh-{name}.{kube.NAMESPACE}.svc"})
        served = Served(name, mode, creds, tmp_path / f"pod-{len(started)}", aios_env)
        started.append(served)
        return served

    yield start
    for served in started:
        served.server.stop(None)


@pytest.mark.parametrize("mode", ["mtls", "tls"])
def test_exec_probe_follows_health_over_tls(mode: str, serve: Callable[..., Served]) -> None:
    served = serve("memory", mode)
    assert served.probe[-2:] == [f"127.0.0.1:{served.port}", f"{kube.RELEASE}-aios-mesh-memory.{kube.NAMESPACE}.svc"]
    down = served.run_probe()
    assert down.returncode == 1 and "NOT_SERVING" in down.stderr, down.stderr
    served.serving(True)
    up = served.run_probe()
    assert up.returncode == 0, up.stderr


def test_kubelet_grpc_probe_cannot_reach_a_tls_port(serve: Callable[..., Served]) -> None:
    """Why the chart uses an exec probe: a plaintext health check (what the kubelet's gRPC probe does)
    gets no answer from the TLS port even when the service is serving."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    served = serve("memory", "tls")
    served.serving(True)
    with grpc.insecure_channel(f"127.0.0.1:{served.port}") as channel, pytest.raises(grpc.RpcError) as info:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_exec_probe_fails_without_a_client_certificate_under_mtls(serve: Callable[..., Served]) -> None:
    served = serve("policy", "mtls")
    served.serving(True)
    assert served.run_probe().returncode == 0
    refused = served.run_probe(AIOS_GRPC_TLS_CERT_FILE="", AIOS_GRPC_TLS_KEY_FILE="")
    assert refused.returncode == 1 and "UNAVAILABLE" in refused.stderr, refused.stderr


def test_test_pod_credential_passes_mutual_tls(serve: Callable[..., Served], tmp_path: Path,
                                               aios_env: Callable[[dict[str, str]], None]) -> None:
    """`aios status` in the helm test pod checks health with the mounted CA and client certificate."""
    from tools.aios.clients import grpc_health

    served = serve("policy", "mtls")
    served.serving(True)
    docs = kube.render(_values("mtls", {"policy": served.port}))
    _c, env, _m = _pod(docs, "cli", Credentials(tmp_path / "pki-0", {}), tmp_path / "cli")
    address = f"127.0.0.1:{served.port}"  # the Service's name does not resolve here; the certificate has loopback
    aios_env({**env, "AIOS_POLICY_ADDR": address})
    assert grpc_health("policy", address, settings=MeshSettings()).up
    aios_env({**env, "AIOS_GRPC_TLS_CERT_FILE": "", "AIOS_GRPC_TLS_KEY_FILE": ""})
    assert not grpc_health("policy", address, settings=MeshSettings(grpc_auth="tls")).up


def test_exec_probe_verifies_the_service_name(serve: Callable[..., Served]) -> None:
    """A certificate without the Service's DNS name (the name the other services dial) fails the probe,
    so such a pod never becomes ready instead of failing every call made to it."""
    served = serve("policy", "tls", hosts={"policy": "policy.wrong.example"})
    served.serving(True)
    refused = served.run_probe()
    assert refused.returncode == 1 and "Hostname Verification" in refused.stderr, refused.stderr


def test_exec_probe_says_what_is_missing(serve: Callable[..., Served]) -> None:
    served = serve("policy", "tls")
    served.serving(True)
    missing = served.run_probe(AIOS_GRPC_TLS_CA_FILE="")
    assert missing.returncode == 1 and "AIOS_GRPC_TLS_CA_FILE" in missing.stderr
    unreadable = served.run_probe(AIOS_GRPC_TLS_CA_FILE="/nonexistent/ca.crt")
    assert unreadable.returncode == 1 and "cannot read" in unreadable.stderr


# -- values the chart refuses -------------------------------------------------------------------------
@pytest.mark.parametrize(("values", "named"), [
    ({}, "auth.issuer is required"),
    ({"auth": {"issuer": ISSUER}}, "auth.serviceSecrets.policy or auth.existingSecret"),
    ({"auth": {"issuer": ISSUER, "serviceSecrets": {n: f"{n}-grpc" for n in kube.SERVICES}}},
     "auth.cli.existingSecret"),
    ({"auth": {"mode": "none", "existingSecret": "aios-grpc"}}, "auth.mode=none mounts no credential"),
    ({"auth": {"mode": "none", "serviceSecrets": {"planner": "p"}}}, "auth.mode=none mounts no credential"),
    ({"auth": {"existingSecret": "s", "issuer": ISSUER, "certManager": {"enabled": True}}},
     "auth.certManager.issuerRef.name"),
    ({"auth": {"mode": "mTLS"}}, "/auth/mode"),
    ({"auth": {"existingSecret": "Not_A_Name"}}, "/auth/existingSecret"),
    ({"auth": {"serviceSecrets": {"gateway": "g"}}}, "'gateway' not allowed"),
    ({"auth": {"keys": {"token": ""}}}, "/auth/keys/token"),
    ({"auth": {"leewaySeconds": 3600}}, "/auth/leewaySeconds"),
])
def test_chart_refuses_auth_values_that_cannot_work(values: dict[str, Any], named: str) -> None:
    assert named in refusal(values)


def test_dev_install_needs_no_secret() -> None:
    docs = kube.render({"auth": {"mode": "none"}})
    assert not [d for d in kube.by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith(("-authz", "-grpc-probe"))]


def test_an_existing_policy_config_map_replaces_the_chart_copy() -> None:
    docs = kube.render(kube.with_auth({"auth": {"authz": {"existingConfigMap": "our-policies"}}}))
    assert not [d for d in kube.by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-authz")]
    for t in services(docs).values():
        volume = next(v for v in t.spec["volumes"] if v["name"] == "authz")
        assert volume["configMap"]["name"] == "our-policies", t.owner


def test_secret_file_check_can_fail() -> None:
    """tests/chart/test_security.py accepts AIOS_TOKEN_FILE as a literal only inside a Secret volume."""
    from tests.chart.test_security import _in_secret_mount

    t = services(kube.render_preset("default"))["planner"]
    container = t.spec["containers"][0]
    assert _in_secret_mount(t, container, "/etc/aios/grpc/token")
    assert not _in_secret_mount(t, container, "/etc/aios/authz/token")
    assert not _in_secret_mount(t, container, "/tmp/token")


def test_certificate_check_can_fail() -> None:
    """The vendored Certificate CRD catches a misspelt field (tests/chart/test_render.py validates with it)."""
    from tests.chart.test_render import crd_validator

    cert = _certificate(kube.render_preset("production"), "planner")
    validator = crd_validator(cert["apiVersion"], cert["kind"])
    assert not list(validator.iter_errors(cert))
    assert list(validator.iter_errors({**cert, "spec": {**cert["spec"], "dnsName": ["x"]}}))
    assert list(validator.iter_errors({**cert, "spec": {**cert["spec"], "usages": ["server-auth"]}}))


def test_upgrade_from_previous_values_needs_what_upgrading_says() -> None:
    """Old values alone are refused naming the value; with the step UPGRADING.md documents (kube.AUTH) they
    render (tests/chart/test_render.py renders them)."""
    upgrading = (kube.CHART / "UPGRADING.md").read_text()
    assert "## 0.2.0 -> 0.3.0" in upgrading and all(f"auth.{k}" in upgrading for k in kube.AUTH["auth"])
    for path in sorted(kube.PREVIOUS_VALUES.glob("*.yaml")):
        import yaml

        assert "auth.issuer" in refusal(yaml.safe_load(path.read_text()) or {}), path.name


def test_exec_probe_dials_ipv6_loopback_on_an_ipv6_pod() -> None:
    docs = kube.render(kube.with_auth({"config": {"listenHost": "::"}}))
    probe = services(docs)["planner"].spec["containers"][0]["livenessProbe"]["exec"]["command"]
    assert probe[-2] == "[::1]:50051"
