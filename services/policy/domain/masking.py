"""PII masking before data leaves for a model or lands in the audit trail.

Two mechanisms, both from the policy's ``pii`` block:
* ``mask_fields``: a key with a listed name anywhere in nested JSON has its
  value masked whatever it looks like (``email``, ``phone``, ``card_number``
  and ``iban`` get their shaped mask; any other listed name becomes ``***``).
* ``mask_patterns``: recognisers run over every string value (and long
  integers, which is how card numbers often arrive in JSON).

Masking errs on the side of hiding: a 10-digit order number reads as a phone
number and is masked, and so is a 16-digit run that fails the Luhn check (a
mistyped card number is still the customer's). That is the cheaper mistake
for data sent to a model. The recognisers run in linear time (RE2, see
``recognisers``): a hostile message cannot stall policy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from services.policy.domain import recognisers as rx
from services.policy.domain.model import PiiSpec

FULL_MASK = "***"
#: Seals one value as a reversible token of the tenant being served.
Tokenize = Callable[[Any], str]


def mask_email(text: str) -> str:
    """``john.doe@example.com`` -> ``j***@example.com``."""
    parts = rx.email_parts(text.strip())
    if not parts:
        return text.strip() if rx.is_masked_email(text.strip()) else FULL_MASK  # masking twice changes nothing
    return f"{parts[0][0]}***@{parts[1]}"


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
    if rx.is_date(candidate):
        return False
    separated = candidate[0] in "+(" or any(c in " ().-" for c in candidate)
    # Plain digit runs need 10+ digits to count; shorter ones are too often ids or amounts.
    return 7 <= digits <= 15 if separated else 10 <= digits <= 15


def _mask_if_luhn(text: str) -> str:
    """A digit run inside a word or a dashed code is a card when its checksum says so."""
    return mask_card(text) if rx.luhn_valid(text) else text


def _sub_phone(text: str) -> str:
    return mask_phone(text) if _phone_like(text) else text


_PATTERN_MASKERS: dict[str, Callable[[str], str]] = {
    "email": lambda s: rx.substitute(rx.EMAIL, s, mask_email, parts=lambda g: f"{g[0][0]}***@{g[1]}"),
    "iban": lambda s: rx.substitute(rx.IBAN, s, mask_iban),
    "card_number": lambda s: rx.substitute(rx.DIGIT_RUN, rx.substitute(rx.CARD, s, mask_card, group=1),
                                           _mask_if_luhn, group=1),
    "phone": lambda s: rx.substitute(rx.PHONE, s, _sub_phone, group=1),
}
# Order matters: emails first (their local part may hold digits), cards before phones.
_PATTERN_ORDER = ("email", "iban", "card_number", "phone")
_FIELD_MASKERS: dict[str, Callable[[str], str]] = {
    "email": mask_email, "card_number": mask_card, "phone": mask_phone, "iban": mask_iban,
}


def mask_text(text: str, patterns: tuple[str, ...]) -> str:
    """``text`` with every value the listed recognisers find masked (linear in ``len(text)``)."""
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


def _seal_field(value: Any, tokenize: Tokenize | None) -> Any:
    if value is None or rx.is_token(value):
        return value  # sealed already (the planner's step inputs carry the run's tokens)
    # Without a key nothing can be sealed: hide the value rather than pass it on.
    return tokenize(value) if tokenize is not None else FULL_MASK


def mask_value(value: Any, pii: PiiSpec, tokenize: Tokenize | None = None) -> Any:
    """A copy of ``value`` (parsed JSON) with PII masked, and the values of ``pii.tokenize_fields``
    sealed by ``tokenize`` (masked when there is none); the input is not changed."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            name = str(k).lower()
            if name in pii.tokenize_fields:
                out[k] = _seal_field(v, tokenize)
            elif name in pii.mask_fields:
                out[k] = _mask_field(name, v)
            else:
                out[k] = mask_value(v, pii, tokenize)
        return out
    if isinstance(value, list):
        return [mask_value(v, pii, tokenize) for v in value]
    if isinstance(value, str):
        return mask_text(value, pii.mask_patterns)
    if isinstance(value, int) and not isinstance(value, bool) and "card_number" in pii.mask_patterns \
            and 13 <= len(str(abs(value))) <= 19:
        return mask_card(str(value))
    return value
