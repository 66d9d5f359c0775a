"""PII recognisers that run in time linear in the text, whatever the text.

The first masker used Python ``re``: its e-mail pattern backtracks at every
start of a long run of local-part characters (~4 s on a 30 KB string, holding
the GIL, so one hostile message froze policy for every tenant). Every pattern
here is RE2 (google-re2): an automaton, no backtracking, linear by
construction. RE2 has no look-around, so the card and phone boundaries that
``re`` checked with ``(?<!..)`` / ``(?!..)`` are written as one consumed
character on each side (or the text's start/end), and the scan resumes at the
end of the value itself, so the character after one value can be the
character before the next: the same matches as the look-around version (the
unit tests compare both on generated text).

Texts are scanned as UTF-8 bytes once: the google-re2 wrapper re-encodes a
``str`` on every search, which would make a text with many values quadratic.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable

import re2  # google-re2 (no type information: mypy treats it as Any)

# Python's \w (letters, digits, underscore; Unicode) as an RE2 class body.
_WORD = r"\pL\pN_"
EMAIL_PATTERN = r"([A-Za-z0-9._%+-]+)@([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,})"
IBAN_PATTERN = r"\b[A-Z]{2}\p{Nd}{2}(?: ?[A-Z0-9]){11,30}\b"
# 13-19 digits, optionally grouped by single spaces or dashes, not inside a word or a dashed code.
CARD_PATTERN = rf"(?:^|[^{_WORD}-])(\p{{Nd}}(?:[ -]?\p{{Nd}}){{12,18}})(?:$|[^{_WORD}-])"
# A run of 13-19 digits, whatever stands around it but another digit ("VISA4111111111111111",
# "4111111111111111-4111111111111111"): masked when it passes the Luhn check.
DIGIT_RUN_PATTERN = r"(?:^|[^\p{Nd}])(\p{Nd}{13,19})(?:$|[^\p{Nd}])"
# Phones: optional +country or (area), digits with common separators.
PHONE_PATTERN = rf"(?:^|[^{_WORD}+(-])((?:\+|\()?\p{{Nd}}[\p{{Nd}} ().-]{{5,18}}\p{{Nd}})(?:$|[^{_WORD}-])"
DATE_PATTERN = r"^\p{Nd}{4}-\p{Nd}{2}-\p{Nd}{2}"
# A sealed value (services.common.pii_tokens): lowercase base32, so no recogniser matches inside it.
TOKEN_PATTERN = r"ptok_[a-z2-7]{40,}"

EMAIL = re2.compile(EMAIL_PATTERN)
IBAN = re2.compile(IBAN_PATTERN)
CARD = re2.compile(CARD_PATTERN)
DIGIT_RUN = re2.compile(DIGIT_RUN_PATTERN)
PHONE = re2.compile(PHONE_PATTERN)
DATE = re2.compile(DATE_PATTERN)
TOKEN = re2.compile(TOKEN_PATTERN)
MASKED_EMAIL = re2.compile(r"[A-Za-z0-9._%+-]\*\*\*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")

#: Every recogniser, by name: all RE2 (a test holds them to it).
PATTERNS: dict[str, str] = {"email": EMAIL_PATTERN, "iban": IBAN_PATTERN, "card_number": CARD_PATTERN, "digit_run": DIGIT_RUN_PATTERN,
                            "phone": PHONE_PATTERN, "date": DATE_PATTERN, "token": TOKEN_PATTERN}

Replace = Callable[[str], str]
#: Values of one recogniser masked one by one in a text; past that, the rest is REST_MASKED.
MAX_VALUES = 1000
REST_MASKED = "[rest masked: more than 1000 personal data values]"
_UNANCHORED = re2._Anchor.UNANCHORED


def substitute(pattern: object, text: str, replace: Replace, group: int = 0,
               parts: Callable[[list[str]], str] | None = None) -> str:
    """``text`` with each match's ``group`` replaced by ``replace(value)`` (or by ``parts`` of the
    match's groups 1..n, which spares parsing the value again); one pass over the bytes.

    The scan resumes where the replaced group ends (not where the match ends), so a boundary
    character consumed after one value can open the next one. It calls the compiled program
    (``_regexp.Match``: google-re2 is pinned) rather than ``search``, which builds a match object
    per value: on a text dense with values that object was most of the cost.

    Linear is not yet cheap: each value costs a few microseconds of Python, so a megabyte of
    card-shaped digit groups took seconds. After ``MAX_VALUES`` values of one recogniser the rest
    of the text is replaced by ``REST_MASKED`` (a text that dense is a dump or an attack; hiding
    the rest is the cheaper mistake), which bounds the work per text."""
    data = text.encode("utf-8")
    seen = 0
    pieces: list[bytes] = []
    last = pos = 0
    size = len(data)
    match = pattern._regexp.Match  # type: ignore[attr-defined]
    while pos <= size:
        spans = match(_UNANCHORED, data, pos, size)
        if spans[0][0] < 0:
            break
        start, end = spans[group]
        seen += 1
        if seen > MAX_VALUES:
            pieces += [data[last:start], REST_MASKED.encode()]
            return b"".join(pieces).decode("utf-8")
        new = parts([data[a:b].decode("utf-8") for a, b in spans[1:]]) if parts else \
            replace(data[start:end].decode("utf-8"))
        pieces += [data[last:start], new.encode("utf-8")]
        last = end
        pos = end if end > pos else pos + 1
    if not pieces:
        return text
    pieces.append(data[last:])
    return b"".join(pieces).decode("utf-8")


def email_parts(text: str) -> tuple[str, str] | None:
    """(local part, domain) when ``text`` is one e-mail address, else None."""
    match = EMAIL.fullmatch(text)
    return (match.group(1), match.group(2)) if match else None


def is_date(text: str) -> bool:
    return DATE.search(text) is not None


def is_masked_email(text: str) -> bool:
    """``j***@example.com``: what ``masking.mask_email`` makes of an address."""
    return MASKED_EMAIL.fullmatch(text) is not None


def is_token(value: object) -> bool:
    """Whether ``value`` has the shape of a sealed value (opening it is the executor's business)."""
    return isinstance(value, str) and TOKEN.fullmatch(value) is not None


def digits_of(text: str) -> str:
    """The decimal digits of ``text`` as ASCII (any script's digits count)."""
    return "".join(str(unicodedata.digit(c)) for c in text if c.isdigit() and unicodedata.digit(c, None) is not None)


def luhn_valid(text: str) -> bool:
    """The Luhn checksum every payment card number carries (separators ignored; 13-19 digits)."""
    digits = digits_of(text)
    if not 13 <= len(digits) <= 19:
        return False
    total = 0
    for n, d in enumerate(reversed(digits)):
        v = int(d) * (2 if n % 2 else 1)
        total += v - 9 if v > 9 else v
    return total % 10 == 0


__all__ = ["CARD", "DIGIT_RUN", "EMAIL", "IBAN", "MAX_VALUES", "PATTERNS", "REST_MASKED", "PHONE", "digits_of", "email_parts", "is_date", "is_token", "luhn_valid",
           "substitute"]
