"""Contracts: every catalog topic has a schema, every schema carries the
envelope, and no schema change breaks readers of the last committed version."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import fastavro
import pytest
from fastavro.utils import generate_many

from services.common.catalog import REPO_ROOT, SCHEMA_DIR, Catalog, load_schemas
from services.common.codec import AvroCodec

pytestmark = pytest.mark.timeout(60)
SCHEMA_FILES = sorted(SCHEMA_DIR.glob("*.avsc"))


def committed(path: Path) -> dict | None:  # type: ignore[type-arg]
    rel = path.relative_to(REPO_ROOT)
    out = subprocess.run(["git", "show", f"HEAD:{rel}"], cwd=REPO_ROOT, capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 else None


def test_every_topic_has_a_schema_and_every_schema_has_the_envelope() -> None:
    catalog = Catalog("x.")
    assert set(catalog.topics) == {"ingress", "commands", "step_requests", "step_results", "workflow_events",
                                   "approvals", "memory_writes", "audit", "usage", "deadletters"}
    for versions in load_schemas().values():
        names = [f["name"] for f in versions[0]["fields"]]
        assert names[:3] == ["event_id", "tenant", "occurred_at"]


@pytest.mark.parametrize("path", SCHEMA_FILES, ids=[p.stem for p in SCHEMA_FILES])
def test_schema_change_is_backward_compatible_with_last_commit(path: Path) -> None:
    """Readers on the new schema must read every record written with the committed one."""
    old = committed(path)
    if old is None:
        pytest.skip(f"{path.name} is new: nothing committed to be compatible with")
    new = json.loads(path.read_text())
    old_parsed, new_parsed = fastavro.parse_schema(old), fastavro.parse_schema(new)
    for record in generate_many(old_parsed, 20):
        import io

        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, old_parsed, record)
        buf.seek(0)
        fastavro.schemaless_reader(buf, old_parsed, new_parsed)


def test_an_incompatible_change_is_detected() -> None:
    """The check above can fail: adding a field without a default breaks old records."""
    old = json.loads((SCHEMA_DIR / "IngressEvent.avsc").read_text())
    new = json.loads(json.dumps(old))
    new["fields"].append({"name": "priority", "type": "int"})
    import io

    buf = io.BytesIO()
    parsed_old = fastavro.parse_schema(old)
    fastavro.schemaless_writer(buf, parsed_old, next(iter(generate_many(parsed_old, 1))))
    buf.seek(0)
    with pytest.raises(Exception, match="priority"):
        fastavro.schemaless_reader(buf, parsed_old, fastavro.parse_schema(new))


def test_codec_round_trips_every_schema() -> None:
    codec = AvroCodec(load_schemas())
    for name, versions in load_schemas().items():
        for record in generate_many(fastavro.parse_schema(versions[0]), 5):
            got_name, got = codec.decode(codec.encode(name, record))
            assert got_name == name and got["event_id"] == record["event_id"]
