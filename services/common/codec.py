"""Avro on the wire, in the Avro spec's single-object encoding: two marker
bytes, the writer schema's 8-byte CRC-64-AVRO fingerprint, then the binary
body. Every record thus names its schema without a registry round trip, and a
reader resolves old writer versions to its current schema."""

from __future__ import annotations

import datetime as dt
import io
import struct
from typing import Any

import fastavro
from fastavro.schema import to_parsing_canonical_form

from services.common.errors import BadRecord, UnknownSchema

MARKER = b"\xc3\x01"
_EMPTY = 0xC15D213AA4D7A795


def _table() -> list[int]:
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (_EMPTY & -(fp & 1))
        table.append(fp)
    return table


_TABLE = _table()


def crc64_avro(data: bytes) -> int:
    """The Rabin fingerprint the Avro spec defines for single-object encoding."""
    fp = _EMPTY
    for byte in data:
        fp = (fp >> 8) ^ _TABLE[(fp ^ byte) & 0xFF]
    return fp


class AvroCodec:
    """Encodes records by schema name; decodes any known writer version."""

    def __init__(self, schemas: dict[str, list[dict[str, Any]]]) -> None:
        self._current: dict[str, Any] = {}
        self._header: dict[str, bytes] = {}
        self._writers: dict[bytes, tuple[str, Any]] = {}
        for name, versions in schemas.items():
            for i, raw in enumerate(versions):
                parsed = fastavro.parse_schema(raw)
                fp = struct.pack("<Q", crc64_avro(to_parsing_canonical_form(parsed).encode()))
                self._writers[fp] = (name, parsed)
                if i == 0:
                    self._current[name] = parsed
                    self._header[name] = MARKER + fp

    def encode(self, schema_name: str, record: dict[str, Any]) -> bytes:
        try:
            schema = self._current[schema_name]
        except KeyError:
            raise UnknownSchema(f"no schema named {schema_name!r}") from None
        buf = io.BytesIO()
        buf.write(self._header[schema_name])
        try:
            fastavro.schemaless_writer(buf, schema, record)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise BadRecord(f"record does not fit {schema_name}: {exc}") from exc
        return buf.getvalue()

    def decode(self, value: bytes | None) -> tuple[str, dict[str, Any]]:
        if not value or value[:2] != MARKER or len(value) < 10:
            raise BadRecord("not an Avro single-object record (expected marker C3 01 and a fingerprint); "
                            "publish with the aios codec or fastavro single-object encoding")
        writer = self._writers.get(value[2:10])
        if writer is None:
            raise UnknownSchema(f"unknown writer schema fingerprint {value[2:10].hex()}; add the schema to "
                                "schemas/ (or schemas/history/) or publish with a known schema")
        name, writer_schema = writer
        try:
            record = fastavro.schemaless_reader(io.BytesIO(value[10:]), writer_schema, self._current[name])
        except Exception as exc:
            raise BadRecord(f"cannot decode {name} body: {exc}") from exc
        if not isinstance(record, dict):
            raise BadRecord(f"{name} body is not a record")
        at = record.get("occurred_at")
        if isinstance(at, dt.datetime):
            record["occurred_at"] = int(at.timestamp() * 1000)
        return name, record
