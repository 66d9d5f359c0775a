"""Tokens and settings of gRPC authentication (services.common.auth), without a network: every way a
token can be wrong is refused with its own reason, key rotation works, and bad settings stop the
process naming the variable."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from services.common.auth import (
    AuthError,
    AuthInterceptor,
    ClientAuth,
    Principal,
    ServerAuth,
    TokenVerifier,
    bearer,
)
from services.common.errors import ConfigError
from services.common.pki import EmbeddedPki, Identity, public_jwk
from services.common.settings import GrpcAuthSettings, load_settings

pytestmark = pytest.mark.timeout(60)
ALICE = Identity("alice", "user", ("acme",), ("viewer",))
PLANNER = Identity("planner", "service", ("*",), ("policy-client",))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> EmbeddedPki:
    return EmbeddedPki(tmp_path_factory.mktemp("pki")).ensure([ALICE, PLANNER])


@pytest.fixture
def verifier(pki: EmbeddedPki) -> TokenVerifier:
    return TokenVerifier(str(pki.jwks_file), issuer=pki.issuer, audience=pki.audience, leeway_s=5)


def _reason(verifier: TokenVerifier, token: str) -> str:
    with pytest.raises(AuthError) as err:
        verifier.verify(token)
    assert token not in str(err.value)  # a refusal never echoes the credential
    return err.value.reason


def test_a_good_token_names_the_principal(pki: EmbeddedPki, verifier: TokenVerifier) -> None:
    principal = verifier.verify(pki.mint(ALICE))
    assert principal == Principal("user", "alice", frozenset({"acme"}), frozenset({"viewer"}))
    assert principal.id == "user:alice" and principal.tenant_for("") == "acme"
    assert verifier.verify(pki.mint(PLANNER)).all_tenants


def test_expired_not_yet_valid_wrong_issuer_and_audience(pki: EmbeddedPki, verifier: TokenVerifier) -> None:
    assert _reason(verifier, pki.mint(ALICE, now=time.time() - 3600, ttl_s=60)) == "expired"
    assert _reason(verifier, pki.mint(ALICE, now=time.time() + 3600)) == "not_yet_valid"
    assert _reason(verifier, pki.mint(ALICE, iss="someone-else")) == "wrong_issuer"
    assert _reason(verifier, pki.mint(ALICE, aud="another-mesh")) == "wrong_audience"


def _hs256(claims: dict[str, object], secret: bytes, kid: str) -> str:
    import hashlib
    import hmac

    def part(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = part(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode()) + "." + \
        part(json.dumps(claims).encode())
    return head + "." + part(hmac.new(secret, head.encode(), hashlib.sha256).digest())


def test_unknown_key_and_tampered_tokens(pki: EmbeddedPki, verifier: TokenVerifier) -> None:
    stranger = ed25519.Ed25519PrivateKey.generate()
    assert _reason(verifier, pki.mint(ALICE, key=stranger)) == "unknown_key"
    header, payload, signature = pki.mint(ALICE).split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["roles"] = ["operator", "privacy-officer"]  # promote ourselves
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    assert _reason(verifier, f"{header}.{forged}.{signature}") == "bad_signature"
    # The stranger's key under our kid: the signature does not verify with the pinned key.
    kid = public_jwk(pki.signing_key().public_key())["kid"]
    impostor = jwt.encode({"sub": "user:alice", "iss": pki.issuer, "aud": pki.audience, "iat": int(time.time()),
                           "exp": int(time.time()) + 60, "tenants": ["*"], "roles": []}, stranger,
                          algorithm="EdDSA", headers={"kid": kid})
    assert _reason(verifier, impostor) == "bad_signature"


def test_algorithm_confusion_and_garbage_are_refused(pki: EmbeddedPki, verifier: TokenVerifier) -> None:
    claims = {"sub": "user:alice", "iss": pki.issuer, "aud": pki.audience, "iat": int(time.time()),
              "exp": int(time.time()) + 60, "tenants": ["acme"], "roles": []}
    kid = public_jwk(pki.signing_key().public_key())["kid"]
    unsigned = jwt.encode(claims, None, algorithm="none", headers={"kid": kid})
    assert _reason(verifier, unsigned) == "malformed"
    # The classic confusion: HMAC-signed with the (public) verification key as the secret.
    secret = base64.urlsafe_b64decode(public_jwk(pki.signing_key().public_key())["x"] + "=")
    assert _reason(verifier, _hs256(claims, secret, kid)) == "malformed"
    assert _reason(verifier, "not-a-jwt") == "malformed"
    assert _reason(verifier, pki.mint(ALICE, sub="alice")) == "malformed"  # no kind
    assert _reason(verifier, pki.mint(ALICE, tenants="acme")) == "malformed"  # not a list
    assert _reason(verifier, pki.mint(ALICE, tenant="globex")) == "malformed"  # default outside its tenants


def test_rotated_keys_take_effect_without_a_restart(pki: EmbeddedPki, tmp_path: Path) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(pki.jwks_file.read_text())
    verifier = TokenVerifier(str(jwks), issuer=pki.issuer, audience=pki.audience)
    old = pki.mint(ALICE)
    assert verifier.verify(old).name == "alice"
    new_key = ed25519.Ed25519PrivateKey.generate()
    jwks.write_text(json.dumps({"keys": [public_jwk(new_key.public_key())]}))
    verifier._checked = 0.0  # the next call looks at the file again (it checks at most once a second)
    assert verifier.verify(pki.mint(ALICE, key=new_key)).name == "alice"
    assert _reason(verifier, old) == "unknown_key"  # and the retired key's tokens stop working, cached or not


def test_a_service_token_needs_its_own_certificate(pki: EmbeddedPki, verifier: TokenVerifier) -> None:
    interceptor = AuthInterceptor(verifier, "mtls")
    token = pki.mint(PLANNER)
    assert interceptor.authenticate(token, {"x509_common_name": [b"planner"]}).name == "planner"
    with pytest.raises(AuthError) as err:
        interceptor.authenticate(token, {"x509_common_name": [b"executor"]})
    assert err.value.reason == "certificate_mismatch"
    with pytest.raises(AuthError) as err:
        interceptor.authenticate("", {"x509_common_name": [b"planner"]})
    assert err.value.reason == "missing"
    assert bearer([("authorization", "Bearer abc")]) == "abc" and bearer([("x", "y")]) == ""


def test_bad_settings_stop_the_process_naming_the_variable(
        pki: EmbeddedPki, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("AIOS_GRPC_AUTH", "none")
    monkeypatch.setenv("AIOS_TOKEN", "secret-token-value")
    with pytest.raises(SystemExit) as stop:
        load_settings(GrpcAuthSettings)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "AIOS_TOKEN is set but AIOS_GRPC_AUTH=none" in err
    assert "secret-token-value" not in err
    monkeypatch.setenv("AIOS_GRPC_AUTH", "mtls")
    monkeypatch.setenv("AIOS_TOKEN_FILE", str(pki.token_file("alice")))
    with pytest.raises(SystemExit):
        load_settings(GrpcAuthSettings)
    assert "AIOS_TOKEN and AIOS_TOKEN_FILE are both set" in capsys.readouterr().err
    monkeypatch.delenv("AIOS_TOKEN")
    monkeypatch.setenv("AIOS_GRPC_TLS_CERT_FILE", str(tmp := pki.dir / "missing.crt"))
    with pytest.raises(SystemExit):
        load_settings(GrpcAuthSettings)
    assert f"AIOS_GRPC_TLS_CERT_FILE='{tmp}'" in capsys.readouterr().err


def test_what_a_server_and_a_client_lack_is_named(pki: EmbeddedPki) -> None:
    with pytest.raises(ConfigError, match="AIOS_GRPC_TLS_CERT_FILE, AIOS_GRPC_TLS_KEY_FILE, AIOS_AUTH_JWKS_FILE, "
                                          "AIOS_AUTH_ISSUER required to serve"):
        ServerAuth.from_settings(GrpcAuthSettings(grpc_auth="mtls", grpc_tls_ca_file=str(pki.ca_file)))
    with pytest.raises(ConfigError, match="AIOS_GRPC_TLS_CA_FILE required to serve"):
        ServerAuth.from_settings(GrpcAuthSettings(
            grpc_auth="mtls", grpc_tls_cert_file=str(pki.cert_file("alice")),
            grpc_tls_key_file=str(pki.key_file("alice")), auth_jwks_file=str(pki.jwks_file), auth_issuer="x"))
    with pytest.raises(ConfigError, match="AIOS_GRPC_TLS_CERT_FILE, AIOS_GRPC_TLS_KEY_FILE required to call"):
        ClientAuth.from_settings(GrpcAuthSettings(grpc_auth="mtls", grpc_tls_ca_file=str(pki.ca_file)))
    assert ClientAuth.from_settings(GrpcAuthSettings(grpc_auth="tls", grpc_tls_ca_file=str(pki.ca_file))) is not None
    assert ClientAuth.from_settings(GrpcAuthSettings(grpc_auth="none")) is None


def test_the_embedded_pki_writes_private_keys_owner_only(pki: EmbeddedPki) -> None:
    for path in (pki.key_file("ca"), pki.key_file("alice"), pki.dir / "token-signing.key", pki.token_file("alice")):
        assert path.stat().st_mode & 0o077 == 0, path
    assert pki.dir.stat().st_mode & 0o077 == 0
    before = pki.cert_file("alice").read_bytes()
    pki.ensure([ALICE, PLANNER])  # a restart reuses what is still valid
    assert pki.cert_file("alice").read_bytes() == before
