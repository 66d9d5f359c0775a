"""The inference HTTP contract: what a request may contain and which tier a
latency class selects. Pure (no Ray, torch or HTTP imports) so the router, the
client and the unit tests share one definition."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# latency_class -> tier. Interactive steps wait on the answer, so they get the
# warm, small-batch tier; bulk work trades latency for batched throughput.
TIERS_BY_LATENCY_CLASS = {"interactive": "low_latency", "bulk": "high_throughput"}
TIERS = ("low_latency", "high_throughput")
MAX_TEXTS = 256
MAX_TEXT_CHARS = 2000


class BadInput(ValueError):
    """The request cannot be served as sent; the message says how to fix it."""


@dataclass(frozen=True)
class InferenceRequest:
    texts: list[str]
    latency_class: str

    @property
    def tier(self) -> str:
        return TIERS_BY_LATENCY_CLASS[self.latency_class]


def parse_body(body: bytes) -> InferenceRequest:
    """A raw classify/embed body (the router's and the direct door's one parser), or BadInput."""
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadInput('body is not valid JSON; send {"texts": ["..."], "latency_class": "interactive"}') from None
    return parse_request(payload)


def parse_request(payload: Any) -> InferenceRequest:
    """Validate a classify/embed body or raise BadInput naming the problem."""
    if not isinstance(payload, dict):
        raise BadInput('body must be a JSON object like {"texts": ["..."], "latency_class": "interactive"}')
    latency_class = payload.get("latency_class")
    if latency_class not in TIERS_BY_LATENCY_CLASS:
        accepted = ", ".join(f'"{name}"' for name in TIERS_BY_LATENCY_CLASS)
        raise BadInput(f"latency_class must be one of {accepted}; got {latency_class!r}")
    return InferenceRequest(texts=_parse_texts(payload.get("texts")), latency_class=latency_class)


def _parse_texts(texts: Any) -> list[str]:
    if texts is None:
        raise BadInput('"texts" is missing: send a list of 1 to 256 strings')
    if not isinstance(texts, list):
        raise BadInput(f'"texts" must be a list of strings, not {type(texts).__name__}; wrap one text as ["..."]')
    if not texts:
        raise BadInput('"texts" is empty: send at least one string')
    if len(texts) > MAX_TEXTS:
        raise BadInput(f'"texts" has {len(texts)} items; send at most {MAX_TEXTS} per request (split the batch)')
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise BadInput(f'"texts"[{i}] is {type(text).__name__}; every item must be a string')
        if len(text) > MAX_TEXT_CHARS:
            raise BadInput(f'"texts"[{i}] has {len(text)} characters; the limit is {MAX_TEXT_CHARS} '
                           "(truncate or split the text)")
    return texts
