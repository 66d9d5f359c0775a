"""Today's (Python ``re``) masker, kept verbatim as the oracle the linear-time
masker is checked against on small inputs: same output, without the e-mail
pattern's quadratic backtracking. Not used by the services."""

# ruff: noqa
from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from services.policy.domain.model import PiiSpec

FULL_MASK = "***"
_EMAIL = re.compile(r"([A-Za-z0-9._%+-]+)@([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,})")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
# 13-19 digits, optionally grouped by single spaces or dashes.
_CARD = re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])")
# Added with the RE2 masker: a Luhn-valid run of 13-19 digits inside a word or a dashed code.
_DIGIT_RUN = re.compile(r"(?<!\d)\d{13,19}(?!\d)")


def _luhn(digits: str) -> bool:
    values = [int(c) for c in digits][::-1]
    return sum(v if i % 2 == 0 else (v * 2 - 9 if v > 4 else v * 2) for i, v in enumerate(values)) % 10 == 0


def _mask_if_luhn(match: re.Match[str]) -> str:
    return mask_card(match.group(0)) if _luhn(match.group(0)) else match.group(0)
# Phones: optional +country or (area), digits with common separators.
_PHONE = re.compile(r"(?<![\w+(-])(?:\+|\()?\d[\d ().-]{5,18}\d(?![\w-])")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}")


def mask_email(text: str) -> str:
    """``john.doe@example.com`` -> ``j***@example.com``."""
    match = _EMAIL.fullmatch(text.strip())
    if not match:
        return FULL_MASK
    return f"{match.group(1)[0]}***@{match.group(2)}"


def _keep_last_digits(text: str, keep: int) -> str:
    digits = sum(c.isdigit() for c in text)
    if digits <= keep:
        return FULL_MASK
    out, seen = [], 0
    for c in text:
        if c.isdigit():
            seen += 1
            out.append(c if seen > digits - keep else "*")
        else:
            out.append(c)
    return "".join(out)


def mask_card(text: str) -> str:
    """Every digit but the last four becomes ``*``; separators stay."""
    return _keep_last_digits(text, 4)


def mask_phone(text: str) -> str:
    """Every digit but the last two becomes ``*``."""
    return _keep_last_digits(text, 2)


def mask_iban(text: str) -> str:
    """Every character but the last four (and spaces) becomes ``*``."""
    compact = text.replace(" ", "")
    if len(compact) <= 4:
        return FULL_MASK
    cut = len(compact) - 4
    out, seen = [], 0
    for c in text:
        if c == " ":
            out.append(c)
            continue
        out.append(c if seen >= cut else "*")
        seen += 1
    return "".join(out)


def _phone_like(candidate: str) -> bool:
    digits = sum(c.isdigit() for c in candidate)
    if _DATE.match(candidate):
        return False
    separated = candidate[0] in "+(" or any(c in " ().-" for c in candidate)
    # Plain digit runs need 10+ digits to count; shorter ones are too often ids or amounts.
    return 7 <= digits <= 15 if separated else 10 <= digits <= 15


def _sub_phone(match: re.Match[str]) -> str:
    text = match.group(0)
    return mask_phone(text) if _phone_like(text) else text


_PATTERN_MASKERS: dict[str, Callable[[str], str]] = {
    "email": lambda s: _EMAIL.sub(lambda m: mask_email(m.group(0)), s),
    "iban": lambda s: _IBAN.sub(lambda m: mask_iban(m.group(0)), s),
    "card_number": lambda s: _DIGIT_RUN.sub(_mask_if_luhn, _CARD.sub(lambda m: mask_card(m.group(0)), s)),
    "phone": lambda s: _PHONE.sub(_sub_phone, s),
}
# Order matters: emails first (their local part may hold digits), cards before phones.
_PATTERN_ORDER = ("email", "iban", "card_number", "phone")
_FIELD_MASKERS: dict[str, Callable[[str], str]] = {
    "email": mask_email, "card_number": mask_card, "phone": mask_phone, "iban": mask_iban,
}


def mask_text(text: str, patterns: tuple[str, ...]) -> str:
    for name in _PATTERN_ORDER:
        if name in patterns:
            text = _PATTERN_MASKERS[name](text)
    return text


def _mask_field(name: str, value: Any) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, dict | list):
        return FULL_MASK
    masker = _FIELD_MASKERS.get(name)
    return masker(str(value)) if masker else FULL_MASK


def mask_value(value: Any, pii: PiiSpec) -> Any:
    """A copy of ``value`` (parsed JSON) with PII masked; the input is not changed."""
    if isinstance(value, dict):
        return {k: (_mask_field(str(k).lower(), v) if str(k).lower() in pii.mask_fields else mask_value(v, pii))
                for k, v in value.items()}
    if isinstance(value, list):
        return [mask_value(v, pii) for v in value]
    if isinstance(value, str):
        return mask_text(value, pii.mask_patterns)
    if isinstance(value, int) and not isinstance(value, bool) and "card_number" in pii.mask_patterns \
            and 13 <= len(str(abs(value))) <= 19:
        return mask_card(str(value))
    return value
