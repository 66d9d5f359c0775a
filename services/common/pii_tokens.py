"""Reversible per-tenant PII tokens: how a value a connector truly needs (the
card id the bank blocks) crosses the mesh without being readable on the way.

The policy service turns each value of a field its ``pii.tokenize_fields``
names into ``ptok_<base32>``: AES-256-GCM under a key derived (HKDF-SHA256)
from one master key and the tenant, with the tenant as associated data. Only
the executor turns a token back, for that tenant, at the connector boundary
(the tools that declare ``detokenize`` in connectors.yaml); the run state,
events, audit records, memory and generator requests only ever hold the
token. A token of another tenant, or a changed one, fails authentication and
never decrypts.

Tokens are lowercase base32 behind ``ptok_``: no RE2 recogniser of
``services.policy.domain.recognisers`` can match inside one (no '@', no
upper-case IBAN prefix, no digit run at a word boundary), so masking a text
that carries a token leaves it whole.

The master key is 32 random bytes, written hex in a file (``AIOS_PII_KEY_FILE``):
the embedded stack makes one at ``make up`` next to its PKI; the Helm chart
mounts it from a Secret. Nothing is committed."""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
from functools import lru_cache
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from services.common.errors import ConfigError, PermanentError

__all__ = ["PREFIX", "InvalidToken", "TokenVault", "is_token", "reseal", "write_master_key"]

PREFIX = "ptok_"
_TOKEN = re.compile(r"ptok_[a-z2-7]{40,}")
_SALT = b"aios-mesh pii tokens v1"
_NONCE = 12


class InvalidToken(PermanentError):
    """A token that does not open for this tenant (another tenant's, altered, or another key's)."""


def is_token(value: Any) -> bool:
    """Whether ``value`` is a whole token (shape only; opening it needs the key and the tenant)."""
    return isinstance(value, str) and _TOKEN.fullmatch(value) is not None


def write_master_key(path: Path) -> Path:
    """A new random master key at ``path`` (0600), unless one is there already."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
    return path


class TokenVault:
    """Seals and opens tokens; one per process, keys derived per tenant on first use."""

    def __init__(self, master_key: bytes) -> None:
        if len(master_key) != 32:
            raise ConfigError(f"the PII master key must be 32 bytes, got {len(master_key)}")
        self._master = master_key
        self._key = lru_cache(maxsize=4096)(self._derive)

    @classmethod
    def from_file(cls, path: str | Path, setting: str = "AIOS_PII_KEY_FILE") -> TokenVault:
        """The vault of a hex key file; a missing or malformed file stops the process naming the setting."""
        try:
            text = Path(path).read_text().strip()
            return cls(bytes.fromhex(text))
        except OSError as exc:
            raise ConfigError(f"{setting}={path}: cannot read the PII master key ({exc.strerror})") from None
        except (ValueError, ConfigError):
            raise ConfigError(f"{setting}={path}: the PII master key must be 64 hex digits (32 bytes); make one "
                              "with `python -c 'import secrets; print(secrets.token_hex(32))'`") from None

    def _derive(self, tenant: str) -> AESGCM:
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=_SALT, info=tenant.encode()).derive(self._master)
        return AESGCM(key)

    def seal(self, tenant: str, value: Any) -> str:
        """``value`` (any JSON value) as a token only this tenant's key opens; a token stays as it is."""
        if is_token(value):
            return str(value)
        nonce = secrets.token_bytes(_NONCE)
        sealed = self._key(tenant).encrypt(nonce, json.dumps(value, separators=(",", ":")).encode(), tenant.encode())
        return PREFIX + base64.b32encode(nonce + sealed).decode().rstrip("=").lower()

    def open(self, tenant: str, token: str) -> Any:
        """The value behind ``token`` for ``tenant``; InvalidToken when it is not this tenant's."""
        if not is_token(token):
            raise InvalidToken(f"not a PII token: a value of {len(str(token))} characters")
        raw = token[len(PREFIX):].upper()
        try:
            blob = base64.b32decode(raw + "=" * (-len(raw) % 8))
            plain = self._key(tenant).decrypt(blob[:_NONCE], blob[_NONCE:], tenant.encode())
        except (InvalidTag, ValueError):
            raise InvalidToken(f"a PII token does not open for tenant {tenant!r}: it was sealed for another "
                               "tenant, altered, or under another master key (AIOS_PII_KEY_FILE)") from None
        return json.loads(plain)

    def open_fields(self, tenant: str, inputs: dict[str, Any],
                    fields: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, str]]:
        """A copy of ``inputs`` with the tokens of the named top-level fields opened, and what each
        opened value was sealed as (to seal it again in what the connector answers)."""
        out, opened = dict(inputs), {}
        for name in fields:
            if is_token(out.get(name)):
                token = out[name]
                out[name] = self.open(tenant, token)
                if isinstance(out[name], str | int) and len(str(out[name])) >= 4:
                    opened[str(out[name])] = token
        return out, opened


def reseal(value: Any, opened: dict[str, str]) -> Any:
    """``value`` (a connector's answer) with every opened value put back as its token: a bank that
    echoes the card id must not carry it into the run's output, events and audit."""
    if not opened:
        return value
    if isinstance(value, dict):
        return {k: reseal(v, opened) for k, v in value.items()}
    if isinstance(value, list):
        return [reseal(v, opened) for v in value]
    if isinstance(value, str | int) and not isinstance(value, bool):
        text = str(value)
        hit = False
        for raw, token in opened.items():
            if raw in text:
                text, hit = text.replace(raw, token), True
        return text if hit else value
    return value
