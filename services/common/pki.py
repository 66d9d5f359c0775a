"""The embedded stack's own credentials: a private CA, one certificate per
identity, a JWT signing key and the tokens it signs, all under one directory
(``<run dir>/pki``), created when the stack starts and never committed.

This is the development and test issuer. In production the CA is the
cluster's (cert-manager, a service mesh) and tokens come from the identity
provider; the services only ever read what this module writes (a CA bundle,
a certificate and key, a token file and the issuer's public keys as a JWKS
file), through the same settings (``services.common.settings.GrpcAuthSettings``).

Keys are ECDSA P-256 (TLS) and Ed25519 (tokens): fast to make, so a fresh
stack costs milliseconds. Private keys are written 0600."""

from __future__ import annotations

import datetime as dt
import json
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["EmbeddedPki", "Identity", "jwk_thumbprint", "public_jwk"]

ISSUER = "aios-embedded-stack"
AUDIENCE = "aios-mesh"
CA_DAYS = 30
CERT_DAYS = 30
TOKEN_TTL_S = 7 * 86400  # the stack's own tokens; a run dir older than this gets new ones at the next start
RENEW_BEFORE_S = 86400


@dataclass(frozen=True)
class Identity:
    """Who a token names: ``kind`` user or service, the tenants it acts for (``*``: all) and its roles."""

    name: str
    kind: str
    tenants: tuple[str, ...]
    roles: tuple[str, ...]
    tenant: str = ""  # the default tenant, when the principal acts for several

    @property
    def subject(self) -> str:
        return f"{self.kind}:{self.name}"


def _b64url(value: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(value).rstrip(b"=").decode()


def public_jwk(key: ed25519.Ed25519PublicKey) -> dict[str, str]:
    """The RFC 8037 JWK of an Ed25519 public key, with its RFC 7638 thumbprint as ``kid``."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    jwk = {"crv": "Ed25519", "kty": "OKP", "x": _b64url(raw)}
    return {**jwk, "kid": jwk_thumbprint(jwk), "alg": "EdDSA", "use": "sig"}


def jwk_thumbprint(jwk: dict[str, str]) -> str:
    import base64
    import hashlib

    canonical = json.dumps({k: jwk[k] for k in ("crv", "kty", "x")}, separators=(",", ":"), sort_keys=True)
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()


def _write(path: Path, data: bytes, *, secret: bool = False) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "aios embedded stack"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class EmbeddedPki:
    """A CA, certificates, an Ed25519 token signing key and tokens under ``directory``."""

    def __init__(self, directory: Path, *, issuer: str = ISSUER, audience: str = AUDIENCE) -> None:
        self.dir = directory
        self.issuer, self.audience = issuer, audience

    # -- files ------------------------------------------------------------------------------------
    @property
    def ca_file(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def jwks_file(self) -> Path:
        return self.dir / "jwks.json"

    def cert_file(self, name: str) -> Path:
        return self.dir / f"{name}.crt"

    def key_file(self, name: str) -> Path:
        return self.dir / f"{name}.key"

    def token_file(self, name: str) -> Path:
        return self.dir / "tokens" / f"{name}.jwt"

    # -- creation ---------------------------------------------------------------------------------
    def ensure(self, identities: Sequence[Identity], *, hosts: Sequence[str] = ("localhost",)) -> EmbeddedPki:
        """Create what is missing or about to expire: the CA, a certificate and a token per identity."""
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        (self.dir / "tokens").mkdir(exist_ok=True)
        fresh_ca = self._ensure_ca()
        self._ensure_signing_key()
        for ident in identities:
            if fresh_ca or not self._valid(self.cert_file(ident.name)):
                self.issue_certificate(ident.name, hosts=[ident.name, *hosts])
            if fresh_ca or not self._token_valid(ident):
                _write(self.token_file(ident.name), self.mint(ident).encode(), secret=True)
        return self

    def _valid(self, path: Path) -> bool:
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except (OSError, ValueError):
            return False
        return cert.not_valid_after_utc.timestamp() - time.time() > RENEW_BEFORE_S

    def _token_valid(self, ident: Identity) -> bool:
        try:
            claims = jwt.decode(self.token_file(ident.name).read_text(), options={"verify_signature": False})
        except (OSError, jwt.PyJWTError):
            return False
        return (claims.get("exp", 0) - time.time() > RENEW_BEFORE_S and claims.get("sub") == ident.subject
                and sorted(claims.get("roles", [])) == sorted(ident.roles)
                and sorted(claims.get("tenants", [])) == sorted(ident.tenants))

    def _ensure_ca(self) -> bool:
        if self._valid(self.ca_file) and self.key_file("ca").exists():
            return False
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (x509.CertificateBuilder().subject_name(_name("aios embedded CA")).issuer_name(_name("aios embedded CA"))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CA_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                             crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        _write(self.key_file("ca"), _pem_key(key), secret=True)
        _write(self.ca_file, cert.public_bytes(serialization.Encoding.PEM))
        return True

    def _ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        cert = x509.load_pem_x509_certificate(self.ca_file.read_bytes())
        key = serialization.load_pem_private_key(self.key_file("ca").read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cert, key

    def issue_certificate(self, name: str, *, hosts: Sequence[str] = ("localhost",), days: float = CERT_DAYS,
                          not_before: dt.datetime | None = None) -> tuple[Path, Path]:
        """A certificate for ``name`` (CN), valid for TLS server and client use on ``hosts`` and loopback."""
        ca_cert, ca_key = self._ca()
        key = ec.generate_private_key(ec.SECP256R1())
        start = not_before or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
        sans: list[x509.GeneralName] = [x509.DNSName(h) for h in dict.fromkeys(hosts)]
        sans += [x509.IPAddress(ip_address("127.0.0.1")), x509.IPAddress(ip_address("::1"))]
        cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(ca_cert.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(start + dt.timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        _write(self.key_file(name), _pem_key(key), secret=True)
        _write(self.cert_file(name), cert.public_bytes(serialization.Encoding.PEM))
        return self.cert_file(name), self.key_file(name)

    def _ensure_signing_key(self) -> None:
        path = self.dir / "token-signing.key"
        if not path.exists():
            _write(path, _pem_key(ed25519.Ed25519PrivateKey.generate()), secret=True)
        jwks = json.dumps({"keys": [public_jwk(self.signing_key().public_key())]}, indent=2).encode()
        if not self.jwks_file.exists() or self.jwks_file.read_bytes() != jwks:  # servers reload it when it changes
            _write(self.jwks_file, jwks)

    def signing_key(self) -> ed25519.Ed25519PrivateKey:
        key = serialization.load_pem_private_key((self.dir / "token-signing.key").read_bytes(), password=None)
        assert isinstance(key, ed25519.Ed25519PrivateKey)
        return key

    # -- tokens -----------------------------------------------------------------------------------
    def mint(self, ident: Identity, *, ttl_s: float = TOKEN_TTL_S, now: float | None = None,
             key: ed25519.Ed25519PrivateKey | None = None, **overrides: Any) -> str:
        """A signed token for ``ident``; ``overrides`` replace claims (tests make bad tokens this way)."""
        issued = time.time() if now is None else now
        key = key or self.signing_key()
        claims: dict[str, Any] = {
            "iss": self.issuer, "aud": self.audience, "sub": ident.subject, "iat": int(issued),
            "nbf": int(issued) - 5, "exp": int(issued + ttl_s), "jti": uuid.uuid4().hex,
            "tenants": list(ident.tenants), "roles": list(ident.roles)}
        if ident.tenant:
            claims["tenant"] = ident.tenant
        claims.update(overrides)
        return jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": public_jwk(key.public_key())["kid"]})


def _pem_key(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
