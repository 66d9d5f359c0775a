"""Contracts: every catalog topic has a schema, every schema carries the
envelope, and no schema change breaks readers of the last committed version."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import fastavro
import pytest
from fastavro.schema import to_parsing_canonical_form
from fastavro.utils import generate_many

from services.common.catalog import SCHEMA_DIR, Catalog, history_version, load_schemas
from services.common.codec import MARKER, AvroCodec, crc64_avro
from services.common.upcast import UPCASTERS

pytestmark = pytest.mark.timeout(60)
SCHEMA_FILES = sorted(SCHEMA_DIR.glob("*.avsc"))


def test_every_topic_has_a_schema_and_every_schema_has_the_envelope() -> None:
    catalog = Catalog("x.")
    assert set(catalog.topics) == {"ingress", "commands", "step_requests", "step_results", "workflow_events",
                                   "approvals", "memory_writes", "audit", "usage", "deadletters"}
    for versions in load_schemas().values():
        names = [f["name"] for f in versions[0]["fields"]]
        assert names[:3] == ["event_id", "tenant", "occurred_at"]


HISTORY = sorted((SCHEMA_DIR / "history").glob("*.avsc"))


def _fingerprinted(schema: dict, record: dict) -> bytes:  # type: ignore[type-arg]
    parsed = fastavro.parse_schema(schema)
    buf = io.BytesIO()
    buf.write(MARKER + struct.pack("<Q", crc64_avro(to_parsing_canonical_form(parsed).encode())))
    fastavro.schemaless_writer(buf, parsed, record)
    return buf.getvalue()


def unreadable_releases(schemas: dict, upcasters: dict, history: list[tuple[int, dict]]) -> list[str]:  # type: ignore[type-arg]
    """Released versions whose records the current schema cannot read (by Avro resolution or an upcaster)."""
    codec = AvroCodec(schemas, upcasters)
    problems = []
    for version, old in history:
        name = f"{old['namespace']}.{old['name']}"
        for record in generate_many(fastavro.parse_schema(old), 20):
            try:
                got_name, got = codec.decode(_fingerprinted(old, record))
                codec.encode(name, got)  # what it became fits the current schema
            except Exception as exc:
                problems.append(f"{name} v{version}: {exc}")
                break
    return problems


def test_every_current_schema_is_its_latest_released_version() -> None:
    """Changing a schema means releasing it: copy it to schemas/history/<Name>.v<N+1>.avsc."""
    for path in SCHEMA_FILES:
        released = sorted(SCHEMA_DIR.glob(f"history/{path.stem}.v*.avsc"), key=history_version)
        assert released, f"{path.name} has no released version in schemas/history/"
        latest = released[-1]
        assert json.loads(latest.read_text()) == json.loads(path.read_text()), (
            f"{path.name} differs from its latest release {latest.name}: copy it to "
            f"schemas/history/{path.stem}.v{history_version(latest) + 1}.avsc, and if it cannot read "
            f"{latest.name} by Avro's rules, register an upcaster in services/common/upcast.py")


@pytest.mark.parametrize("path", HISTORY, ids=[p.stem for p in HISTORY])
def test_every_released_version_is_readable_by_the_current_schema(path: Path) -> None:
    old = json.loads(path.read_text())
    assert unreadable_releases(load_schemas(), UPCASTERS, [(history_version(path), old)]) == []


def test_a_breaking_change_without_an_upcaster_is_detected() -> None:
    """The check can fail: drop the upcaster of a breaking change and v1 commands no longer read."""
    v1 = json.loads((SCHEMA_DIR / "history" / "WorkflowCommand.v1.avsc").read_text())
    without = {k: v for k, v in UPCASTERS.items() if k[0] != "aiosmesh.v1.WorkflowCommand"}
    assert unreadable_releases(load_schemas(), without, [(1, v1)])
    # and a field added without a default breaks readers of every older record
    schemas = load_schemas()
    ingress = json.loads(json.dumps(schemas["aiosmesh.v1.IngressEvent"][0]))
    ingress["fields"].append({"name": "priority", "type": "int"})
    schemas["aiosmesh.v1.IngressEvent"] = [ingress, *schemas["aiosmesh.v1.IngressEvent"][1:]]
    old = json.loads((SCHEMA_DIR / "history" / "IngressEvent.v1.avsc").read_text())
    assert any("priority" in p for p in unreadable_releases(schemas, UPCASTERS, [(1, old)]))


def test_a_v1_command_upcasts_to_its_typed_record() -> None:
    v1 = json.loads((SCHEMA_DIR / "history" / "WorkflowCommand.v1.avsc").read_text())
    record = {"event_id": "e1", "tenant": "t", "occurred_at": 1, "run_id": "r1", "command": "approve",
              "workflow": None, "workflow_version": None, "input_json": None, "step_id": "pay", "actor": "ann",
              "reason": "looks right", "payload_json": None, "timer_id": None}
    _name, got = AvroCodec(load_schemas()).decode(_fingerprinted(v1, record))
    assert got["command"] == ("aiosmesh.v1.ApproveStep", {"step_id": "pay", "reason": "looks right"})
    assert got["actor"] == "ann" and got["run_id"] == "r1"


def test_codec_round_trips_every_schema() -> None:
    codec = AvroCodec(load_schemas())
    for name, versions in load_schemas().items():
        for record in generate_many(fastavro.parse_schema(versions[0]), 5):
            got_name, got = codec.decode(codec.encode(name, record))
            assert got_name == name and got["event_id"] == record["event_id"]
