"""Erasing a data subject from the audit trail (GDPR art. 17), without erasing
the trail: memory's ``Forget`` publishes a ``memory.forget`` audit record;
observability then rewrites every stored entry of the tenant that mentions the
subject. The entry stays (who did what, when, under which policy: what an
auditor needs), its payload goes, and the subject's id is cut out of its
reason and actor. The ``memory.forget`` entry itself keeps that the erasure
happened, with the subject only as a salted hash an auditor can check a
known id against.

A subject matches as a whole identifier: ``cust-42`` is cut from
``for cust-42.`` but not from ``cust-420``. Pure: entries in, entries out."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re

from services.observability.domain.entries import AuditEntry

FORGET_ACTION = "memory.forget"
ERASED = "[erased]"
# A match must not be part of a longer identifier: no identifier character (nor a dot joining one)
# right before or after it; a sentence's full stop after it still ends it.
_BEFORE = r"(?<![A-Za-z0-9_:\-])(?<![A-Za-z0-9_]\.)"
_AFTER = r"(?![A-Za-z0-9_:\-]|\.[A-Za-z0-9_])"


def subject_hash(tenant: str, subject: str) -> str:
    """What the erasure record keeps of the subject: sha256 of ``tenant:subject``."""
    return hashlib.sha256(f"{tenant}:{subject}".encode()).hexdigest()


def forgotten_subject(entry: AuditEntry) -> str | None:
    """The subject a ``memory.forget`` entry erased, else None."""
    if entry.action != FORGET_ACTION or entry.service != "memory":
        return None
    try:
        subject = json.loads(entry.detail_json or "{}").get("subject")
    except (ValueError, AttributeError):
        return None
    return subject if isinstance(subject, str) and subject else None


class Eraser:
    """Rewrites entries of one tenant so that one subject no longer appears in them."""

    def __init__(self, tenant: str, subject: str, erasure_event_id: str) -> None:
        self.tenant, self.subject, self.erasure_event_id = tenant, subject, erasure_event_id
        # The subject as it appears raw, in a JSON string (a payload), and in a JSON string inside
        # one (the payload as the stored entry holds it), as a whole identifier.
        once = json.dumps(subject)[1:-1]
        forms = {subject, once, json.dumps(once)[1:-1]}
        # Longest first, so the regex takes a whole escaped form before a shorter one inside it.
        self._forms = tuple(sorted(forms, key=lambda f: (-len(f), f)))
        alternatives = "|".join(re.escape(f) for f in self._forms)
        self._pattern = re.compile(rf"{_BEFORE}(?:{alternatives}){_AFTER}")

    def mentions(self, raw: str) -> bool:
        """Whether a stored entry (its JSON) mentions the subject: a cheap test before decoding."""
        return any(form in raw for form in self._forms) and self._pattern.search(raw) is not None

    def erase(self, entry: AuditEntry) -> AuditEntry:
        """The entry without the subject: the erasure record hashes it, any other loses its payload."""
        if forgotten_subject(entry) == self.subject:
            detail = json.loads(entry.detail_json)
            detail.pop("subject", None)
            detail = {"subject_sha256": subject_hash(self.tenant, self.subject), **detail}
            return dataclasses.replace(entry, detail_json=json.dumps(detail, separators=(",", ":")))
        detail_json = entry.detail_json
        if self._pattern.search(detail_json or ""):
            detail_json = json.dumps({"erased": "data subject erasure", "erasure_event_id": self.erasure_event_id},
                                     separators=(",", ":"))
        return dataclasses.replace(entry, detail_json=detail_json, reason=self._pattern.sub(ERASED, entry.reason),
                                   actor=self._pattern.sub(ERASED, entry.actor),
                                   step_id=self._pattern.sub(ERASED, entry.step_id))


__all__ = ["ERASED", "FORGET_ACTION", "Eraser", "forgotten_subject", "subject_hash"]
