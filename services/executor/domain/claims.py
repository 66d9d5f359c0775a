"""Claim check: a tool output too big for a Kafka record travels by reference.

The output is stored once, addressed by its SHA-256, and the step result
carries ``{"$claim": <key>, "bytes": <n>, "sha256": <hex>}`` instead. The
decision is made after the effect happened, so a big output never fails the
step: it only changes how the output travels."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

__all__ = ["CLAIM_FIELD", "ClaimCheck", "claim_check", "claim_reference", "is_claim"]

CLAIM_FIELD = "$claim"


@dataclass(frozen=True)
class ClaimCheck:
    """An encoded output that must be stored by reference."""

    sha256: str
    size: int


def claim_check(encoded: bytes, threshold: int) -> ClaimCheck | None:
    """A claim check for an encoded output over ``threshold`` bytes, else None (it travels inline)."""
    if len(encoded) <= threshold:
        return None
    return ClaimCheck(hashlib.sha256(encoded).hexdigest(), len(encoded))


def claim_reference(key: str, check: ClaimCheck) -> dict[str, Any]:
    """The output that stands in for a stored one."""
    return {CLAIM_FIELD: key, "bytes": check.size, "sha256": check.sha256}


def is_claim(output: Any) -> bool:
    """Whether an output is a claim reference."""
    return isinstance(output, dict) and isinstance(output.get(CLAIM_FIELD), str) and "sha256" in output
