"""Erasing a data subject from stored audit entries: whole identifiers only,
inside JSON payloads too; the erasure record keeps only a hash."""

from __future__ import annotations

import json

from services.observability.domain.entries import AuditEntry
from services.observability.domain.erasure import ERASED, Eraser, forgotten_subject, subject_hash


def _entry(**kw: object) -> AuditEntry:
    return AuditEntry(**{"event_id": "e1", "tenant": "t1", "occurred_at_ms": 1.0, "service": "policy",
                         "action": "policy.evaluate", **kw})  # type: ignore[arg-type]


def test_a_subject_is_cut_as_a_whole_identifier() -> None:
    eraser = Eraser("t1", "cust-42", "forget-1")
    named = _entry(reason="checked for cust-42.", detail_json=json.dumps({"customer_id": "cust-42"}))
    assert eraser.mentions(named.to_json())
    erased = eraser.erase(named)
    assert erased.reason == f"checked for {ERASED}."
    assert json.loads(erased.detail_json) == {"erased": "data subject erasure", "erasure_event_id": "forget-1"}
    assert (erased.event_id, erased.action, erased.occurred_at_ms) == ("e1", "policy.evaluate", 1.0)  # kept
    longer = _entry(reason="cust-420 and x-cust-42", detail_json='{"c": "cust-42a"}')
    assert not eraser.mentions(longer.to_json()) and eraser.erase(longer) == longer


def test_a_subject_that_json_escapes_is_found_in_payloads() -> None:
    eraser = Eraser("t1", 'ann"o', "f")
    entry = _entry(detail_json=json.dumps({"who": 'ann"o'}))
    assert eraser.mentions(entry.to_json())
    assert json.loads(eraser.erase(entry).detail_json)["erased"] == "data subject erasure"


def test_the_erasure_record_keeps_only_a_hash() -> None:
    forget = _entry(service="memory", action="memory.forget", actor="user:pia",
                    detail_json=json.dumps({"subject": "cust-42", "erased": 2, "by_kind": {"fact": 2}}))
    assert forgotten_subject(forget) == "cust-42"
    kept = Eraser("t1", "cust-42", forget.event_id).erase(forget)
    assert json.loads(kept.detail_json) == {"subject_sha256": subject_hash("t1", "cust-42"), "erased": 2,
                                            "by_kind": {"fact": 2}}
    assert forgotten_subject(_entry(action="memory.forget", detail_json="{}")) is None  # not memory's
