"""PII never leaves unmasked, through the whole mesh: held-out BANKING77
messages carrying e-mail addresses, phone numbers, Luhn-valid card numbers
and IBANs (and a card number as the card id the bank must block) go in as
upstream events; afterwards none of those values is in the audit trail, the
workflow events (read off the topic), the step requests the executor and its
generator got, memory episodes, the runs the planner shows, what the mailer
sent, the services' logs or any metric label, while the bank's card.block
received the real card number (the executor opened its token)."""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from aiosmesh.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    memory_pb2,
    memory_pb2_grpc,
    workflow_pb2,
    workflow_pb2_grpc,
)
from infra.stack import Stack
from services.common.catalog import Catalog
from services.common.codec import AvroCodec
from services.common.errors import BadRecord, UnknownSchema
from services.common.grpc_server import channel
from services.common.kafka import ConsumerLoop, MeshProducer, new_event_id, now_ms
from services.policy.domain.recognisers import luhn_valid
from tests.conftest import topic_from_start, wait_for
from tools import triage
from tools.demo import FINAL, Approver

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
CARD_INTENTS = {"lost_or_stolen_card", "compromised_card", "card_swallowed"}


def _luhn_card(n: int) -> str:
    """A 16-digit Visa-shaped number that passes the Luhn check."""
    body = f"4{n:014d}"
    for check in "0123456789":
        if luhn_valid(body + check):
            return body + check
    raise AssertionError("no check digit")  # pragma: no cover


def _iban(n: int) -> str:
    """A German IBAN with valid check digits (ISO 13616 mod 97)."""
    bban = f"37040044{n:010d}"
    digits = "".join(str(int(c, 36)) for c in bban + "DE00")
    return f"DE{98 - int(digits) % 97:02d}{bban}"


def _spaced(value: str) -> str:
    return " ".join(value[i:i + 4] for i in range(0, len(value), 4))


def _messages() -> list[tuple[triage.Message, dict[str, Any], list[str]]]:
    """Card-block and other messages, each with its own PII in the text and a card number as card id."""
    pool = triage.load_holdout(600, seed=23)
    cards = [m for m in pool if m.label in CARD_INTENTS][:6]
    others = [m for m in pool if m.label not in CARD_INTENTS][:10]
    out = []
    for i, msg in enumerate(cards + others):
        email, phone = f"jo.{i}.{uuid.uuid4().hex[:6]}@mail-{i}.example.com", f"+44 7700 9{i:05d}"
        card, iban, card_id = _luhn_card(4111_0000_0000 + 97 * i), _iban(1000 + i), _luhn_card(5_0000_0000 + 31 * i)
        text = f"{msg.text} You can reach me at {email} or {phone}. Card {_spaced(card)}, refunds to {_spaced(iban)}."
        data = {"text": text, "customer_id": msg.customer_id, "card_id": card_id, "channel": "email",
                "message_id": msg.message_id, "email": email, "phone": phone}
        out.append((msg, data, [email, phone, card, _spaced(card), iban, _spaced(iban), card_id]))
    return out


def _topic(env: dict[str, str], catalog: Catalog, role: str) -> list[str]:
    """Every record of a topic, decoded, as JSON text (one that does not decode, as its bytes)."""
    codec = AvroCodec(catalog.schemas)
    topic = catalog.topic(role)
    with topic_from_start(env["AIOS_KAFKA_BOOTSTRAP"], topic, f"pii-{uuid.uuid4().hex}") as consumer:
        out: list[str] = []
        idle_until = time.monotonic() + 3
        while time.monotonic() < idle_until:
            batch = consumer.consume(500, timeout=0.5)
            if batch:
                idle_until = time.monotonic() + 3
            for m in batch:
                if m.error():
                    continue
                try:
                    out.append(json.dumps(codec.decode(m.value())[1], default=str))
                except (BadRecord, UnknownSchema):
                    # Another test's poison record on the shared topic (a dead-letter test): its bytes are searched.
                    out.append((m.value() or b"").decode("utf-8", errors="replace"))
        return out


def _leaks(where: str, texts: list[str], values: list[str]) -> list[str]:
    blob = "\n".join(texts)
    return [f"{where}: {v}" for v in values if v in blob]


def test_no_pii_value_leaves_unmasked_and_the_bank_gets_the_real_card_id(mesh: Stack) -> None:
    env = mesh.env()
    catalog = Catalog(mesh.topic_prefix)
    producer = MeshProducer(env["AIOS_KAFKA_BOOTSTRAP"], catalog, AvroCodec(catalog.schemas))
    stub = workflow_pb2_grpc.WorkflowServiceStub(channel(env["AIOS_PLANNER_ADDR"]))
    approver = Approver(stub, "demo")
    approvals = ConsumerLoop(service="test", group=f"{mesh.topic_prefix}pii-approver", roles=["approvals"],
                             handler=approver, bootstrap=env["AIOS_KAFKA_BOOTSTRAP"], catalog=catalog,
                             codec=AvroCodec(catalog.schemas), producer=producer).start()
    messages = _messages()
    sent: dict[str, dict[str, Any]] = {}
    try:
        for msg, data, _values in messages:
            event_id = new_event_id()
            sent[event_id] = data
            producer.send("ingress", msg.customer_id, {
                "event_id": event_id, "tenant": "demo", "occurred_at": now_ms(), "source": "helpdesk",
                "type": "support.message.received", "subject": msg.customer_id, "data_json": json.dumps(data),
                "workflow": None})
        producer.flush()

        def finished() -> list[workflow_pb2.Run]:
            runs = stub.ListRuns(workflow_pb2.ListRunsRequest(tenant="demo", limit=1000), timeout=10).runs
            mine = [r for r in runs if json.loads(r.input_json).get("event", {}).get("id") in sent]
            return mine if len(mine) == len(sent) and all(r.status in FINAL for r in mine) else []

        runs = wait_for(finished, timeout_s=300, interval_s=1, message=f"{len(sent)} runs to finish")
    finally:
        approvals.stop()
    values = [v for _m, _d, vs in messages for v in vs]
    assert len(values) == len(set(values)) == 7 * len(messages)

    # The words still classify: the masked text routed the card messages to the card-block workflow.
    by_event = {json.loads(r.input_json)["event"]["id"]: r for r in runs}
    card_runs = [by_event[e] for e, d in sent.items() if by_event[e].workflow == "support-card-block"]
    assert len(card_runs) >= 4, [r.workflow for r in runs]
    for run in runs:
        shown = json.loads(run.input_json)
        assert shown["card_id"].startswith("ptok_") and "***" in shown["text"]

    # The readers see what is there: every value as it was sent is in the upstream events themselves
    # (card numbers and IBANs were sent spaced; their plain forms are checked below as well).
    as_sent = [v for _m, _d, vs in messages for n, v in enumerate(vs) if n not in (2, 4)]
    assert len(_leaks("ingress", _topic(env, catalog, "ingress"), as_sent)) == len(as_sent) == 5 * len(messages)
    # Where PII could have gone.
    leaks = _leaks("runs", [str(r) for r in runs], values)
    for role in ("workflow_events", "audit", "step_requests", "step_results", "approvals", "memory_writes"):
        leaks += _leaks(f"topic {role}", _topic(env, catalog, role), values)
    audit = audit_pb2_grpc.AuditServiceStub(channel(env["AIOS_OBSERVABILITY_ADDR"]))

    def trail(run_id: str) -> list[str] | None:
        """The run's audit entries once observability holds any (its consumers trail the run)."""
        try:
            return [str(e) for e in audit.Timeline(audit_pb2.TimelineRequest(tenant="demo", run_id=run_id),
                                                   timeout=10).entries] or None
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    entries = [e for r in runs for e in wait_for(lambda r=r: trail(r.run_id), 30, message=f"{r.run_id}'s trail")]
    assert entries
    leaks += _leaks("audit trail", entries, values)
    memory = memory_pb2_grpc.MemoryServiceStub(channel(env["AIOS_MEMORY_ADDR"]))
    episodes = memory.ListEpisodes(memory_pb2.ListEpisodesRequest(tenant="demo", limit=500), timeout=10).episodes
    leaks += _leaks("memory episodes", [str(e) for e in episodes], values)
    state = httpx.get(env["AIOS_SANDBOX_URL"] + "/_sandbox/state", timeout=5).json()
    leaks += _leaks("mailer", [json.dumps(state.get("outbox", []))], values)
    logs = [p.read_text(errors="replace") for p in Path(mesh.log_dir).glob("*") if p.is_file()
            and not p.name.startswith("sandbox")]  # the bank is the one outside party that may see them
    assert logs
    leaks += _leaks("service logs", logs, values)
    labels = []
    for port in mesh.ports.metrics.values():
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        labels += re.findall(r'="([^"]*)"', text)
    assert labels
    leaks += _leaks("metric labels", labels, values)
    assert leaks == [], f"raw PII found: {leaks[:20]}"

    # ...while the bank blocked the real card numbers of the approved card blocks (its token opened).
    blocked = {cid for cid, card in state["cards"].items() if card["status"] == "blocked"}
    approved = [r for r in card_runs if r.status == "completed"]
    assert approved, [r.status for r in card_runs]
    for run in approved:
        real = sent[json.loads(run.input_json)["event"]["id"]]["card_id"]
        assert real in blocked, f"the bank never blocked {real}"
        assert json.loads(run.output_json)["card"]["card_id"].startswith("ptok_")  # its echo sealed again
