"""Support triage traffic: held-out BANKING77 messages as upstream events,
and the routing truth to score the mesh against (shared by the demo, the
end-to-end test and the benchmarks)."""

from __future__ import annotations

import csv
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from services.common.catalog import REPO_ROOT
from services.common.kafka import MeshProducer, new_event_id, now_ms

HOLDOUT = REPO_ROOT / ".cache" / "banking77-holdout.csv"


@dataclass(frozen=True)
class Message:
    message_id: str
    text: str
    label: str
    customer_id: str
    card_id: str


def load_holdout(n: int, seed: int = 11, path: Path = HOLDOUT) -> list[Message]:
    """``n`` held-out messages (never used to fit the classifier), in a fixed shuffled order."""
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `make model` (python -m services.inference.fit) first")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    random.Random(seed).shuffle(rows)
    out = []
    for i, row in enumerate(rows[:n]):
        digest = hashlib.sha256(row["text"].encode()).hexdigest()
        out.append(Message(message_id=f"msg-{i:05d}-{digest[:6]}", text=row["text"], label=row["category"],
                           customer_id=f"cust-{int(digest[:6], 16) % 5000:04d}", card_id=f"card-{digest[6:12]}"))
    return out


def publish(producer: MeshProducer, messages: list[Message], tenant: str) -> dict[str, Message]:
    """Publish each message as the helpdesk would: one support.message.received event, keyed by customer."""
    by_event: dict[str, Message] = {}
    for msg in messages:
        event_id = new_event_id()
        by_event[event_id] = msg
        data = {"text": msg.text, "customer_id": msg.customer_id, "card_id": msg.card_id, "channel": "email",
                "message_id": msg.message_id}
        producer.send("ingress", msg.customer_id, {
            "event_id": event_id, "tenant": tenant, "occurred_at": now_ms(), "source": "helpdesk",
            "type": "support.message.received", "subject": msg.customer_id, "data_json": json.dumps(data),
            "workflow": None})
    producer.flush()
    return by_event

