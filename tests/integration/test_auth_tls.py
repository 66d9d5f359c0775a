"""Certificates and tokens on the wire: a server under mutual TLS refuses plaintext, a client without a
certificate, a certificate of another CA, an expired certificate and a token of another service; a
client refuses a server it cannot verify; health and reflection answer without a token; and what the
metrics endpoint shows holds no credential."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY, generate_latest

from aiosmesh.v1 import memory_pb2, memory_pb2_grpc
from infra.stack import procs
from services.common import authz
from services.common.auth import ClientAuth, ServerAuth, TokenSource
from services.common.grpc_server import serve_grpc
from services.common.pki import EmbeddedPki, Identity
from services.common.settings import GrpcAuthSettings

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
REPO = Path(__file__).resolve().parents[2]
VIEWER = Identity("vera", "user", ("acme",), ("viewer",))


class _Memory(memory_pb2_grpc.MemoryServiceServicer):
    def ListEpisodes(self, request: memory_pb2.ListEpisodesRequest, context: grpc.ServicerContext) -> object:
        authz.require(context, "ReadMemory", tenant=request.tenant)
        return memory_pb2.ListEpisodesResponse()


@dataclass
class Server:
    pki: EmbeddedPki
    other: EmbeddedPki  # a CA the server does not trust
    address: str

    def client(self, *, cert: tuple[EmbeddedPki, str] | None, token: str, ca: EmbeddedPki | None = None) -> ClientAuth:
        pki, name = cert if cert else (self.pki, "")
        return ClientAuth(mode="mtls", ca=(ca or self.pki).ca_file.read_bytes(),
                          cert=pki.cert_file(name).read_bytes() if cert else b"",
                          key=pki.key_file(name).read_bytes() if cert else b"", token=TokenSource(token))

    def list_episodes(self, client: ClientAuth | None) -> grpc.StatusCode:
        chan = grpc.insecure_channel(self.address) if client is None else \
            client.secure_channel(self.address)
        with chan:
            try:
                memory_pb2_grpc.MemoryServiceStub(chan).ListEpisodes(memory_pb2.ListEpisodesRequest(), timeout=5)
            except grpc.RpcError as exc:
                return exc.code()  # type: ignore[no-any-return]
        return grpc.StatusCode.OK


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    pki = EmbeddedPki(tmp_path_factory.mktemp("pki")).ensure([VIEWER, Identity("planner", "service", ("*",), ())])
    other = EmbeddedPki(tmp_path_factory.mktemp("other")).ensure([VIEWER])
    pki.issue_certificate("memory")
    pki.issue_certificate("stale", not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=3), days=1)
    settings = GrpcAuthSettings(
        grpc_auth="mtls", grpc_tls_ca_file=str(pki.ca_file), grpc_tls_cert_file=str(pki.cert_file("memory")),
        grpc_tls_key_file=str(pki.key_file("memory")), auth_jwks_file=str(pki.jwks_file), auth_issuer=pki.issuer,
        auth_audience=pki.audience)
    authz.install(authz.Authorizer(REPO / "policies" / "authz.cedar", REPO / "policies" / "authz.cedarschema"))
    address = f"127.0.0.1:{procs.free_port()}"
    grpc_server, _health = serve_grpc(address, [(memory_pb2_grpc.add_MemoryServiceServicer_to_server, _Memory(),
                                                 "aiosmesh.v1.MemoryService")], auth=ServerAuth.from_settings(settings))
    try:
        yield Server(pki, other, address)
    finally:
        grpc_server.stop(0)
        authz.install(None)


def test_the_right_certificate_and_token_get_through(server: Server) -> None:
    assert server.list_episodes(server.client(cert=(server.pki, "vera"), token=server.pki.mint(VIEWER))) == \
        grpc.StatusCode.OK


def test_transport_failures_never_reach_the_service(server: Server) -> None:
    token = server.pki.mint(VIEWER)
    assert server.list_episodes(None) == grpc.StatusCode.UNAVAILABLE  # plaintext to a TLS port
    assert server.list_episodes(server.client(cert=None, token=token)) == grpc.StatusCode.UNAVAILABLE
    assert server.list_episodes(server.client(cert=(server.other, "vera"), token=token)) == \
        grpc.StatusCode.UNAVAILABLE  # a certificate of a CA the server does not trust
    assert server.list_episodes(server.client(cert=(server.pki, "stale"), token=token)) == \
        grpc.StatusCode.UNAVAILABLE  # expired
    # The client does not trust the server's CA: it never sends its token.
    assert server.list_episodes(server.client(cert=(server.pki, "vera"), token=token, ca=server.other)) == \
        grpc.StatusCode.UNAVAILABLE


def test_token_failures_are_unauthenticated(server: Server) -> None:
    cert = (server.pki, "vera")
    assert server.list_episodes(server.client(cert=cert, token="")) == grpc.StatusCode.UNAUTHENTICATED
    expired = server.pki.mint(VIEWER, now=0, ttl_s=60)
    assert server.list_episodes(server.client(cert=cert, token=expired)) == grpc.StatusCode.UNAUTHENTICATED
    foreign = server.other.mint(VIEWER)  # signed by a key the server did not pin
    assert server.list_episodes(server.client(cert=cert, token=foreign)) == grpc.StatusCode.UNAUTHENTICATED
    # A service's token over somebody else's certificate.
    planner = server.pki.mint(Identity("planner", "service", ("*",), ("memory-client",)))
    assert server.list_episodes(server.client(cert=cert, token=planner)) == grpc.StatusCode.UNAUTHENTICATED
    server.pki.issue_certificate("planner")
    assert server.list_episodes(server.client(cert=(server.pki, "planner"), token=planner)) == \
        grpc.StatusCode.INVALID_ARGUMENT  # through: a service must name the tenant


def test_a_rotated_token_file_is_read_again_and_a_gap_in_rotation_keeps_the_last_token(
        server: Server, tmp_path: Path) -> None:
    """The token comes from a file that rotates (a mounted Secret): each call reads the newest; while
    the file is being replaced (gone for a moment) calls carry the last token instead of failing
    outside gRPC (was: FileNotFoundError in the caller); a token that was never readable fails the
    call as UNAVAILABLE, which callers retry."""
    path = tmp_path / "token"
    path.write_text(server.pki.mint(VIEWER, now=0, ttl_s=60))  # expired
    cert = server.client(cert=(server.pki, "vera"), token="")
    client = ClientAuth(mode="mtls", ca=cert.ca, cert=cert.cert, key=cert.key, token=TokenSource(path=str(path)))
    assert server.list_episodes(client) == grpc.StatusCode.UNAUTHENTICATED
    path.write_text(server.pki.mint(VIEWER) + "\n")  # rotated: a fresh one (size differs)
    assert server.list_episodes(client) == grpc.StatusCode.OK
    path.unlink()
    assert server.list_episodes(client) == grpc.StatusCode.OK  # mid-rotation: the last token
    path.write_text("")  # truncated, about to be rewritten
    assert server.list_episodes(client) == grpc.StatusCode.OK  # still the last token
    path.write_text(server.pki.mint(VIEWER, now=0, ttl_s=60) + "\n\n")  # rewritten (expired, to tell it apart)
    assert server.list_episodes(client) == grpc.StatusCode.UNAUTHENTICATED  # the new one is used at once
    for never in (tmp_path, tmp_path / "missing", tmp_path / "empty"):  # a directory, no file, an empty file
        if never.name == "empty":
            never.write_text("")
        unreadable = ClientAuth(mode="mtls", ca=cert.ca, cert=cert.cert, key=cert.key,
                                token=TokenSource(path=str(never)))
        assert server.list_episodes(unreadable) == grpc.StatusCode.UNAVAILABLE, never


def test_health_and_reflection_need_no_token(server: Server) -> None:
    client = server.client(cert=(server.pki, "vera"), token="")
    with client.secure_channel(server.address) as chan:
        status = health_pb2_grpc.HealthStub(chan).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        answers = reflection_pb2_grpc.ServerReflectionStub(chan).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        names = {s.name for a in answers for s in a.list_services_response.service}
    assert "aiosmesh.v1.MemoryService" in names


def test_metrics_show_refusals_but_no_credential(server: Server) -> None:
    token = server.pki.mint(VIEWER, now=0, ttl_s=60)
    assert server.list_episodes(server.client(cert=(server.pki, "vera"), token=token)) == \
        grpc.StatusCode.UNAUTHENTICATED
    page = generate_latest(REGISTRY).decode()
    assert 'aios_grpc_auth_failures_total{reason="expired"}' in page
    secrets = [token, server.pki.mint(VIEWER), server.pki.key_file("memory").read_text().splitlines()[1],
               server.pki.token_file("vera").read_text()]
    assert not [s for s in secrets if s and s in page]
    assert "BEGIN" not in page and "eyJ" not in page  # no PEM block, no JWT
