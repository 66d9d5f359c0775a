"""Avro on the wire, in the Avro spec's single-object encoding: two marker
bytes, the writer schema's 8-byte CRC-64-AVRO fingerprint, then the binary
body. Every record thus names its schema without a registry round trip, and a
reader resolves old writer versions to its current schema."""

from __future__ import annotations

import datetime as dt
import io
import struct
from collections.abc import Callable
from typing import Any

import fastavro
from fastavro.schema import to_parsing_canonical_form

from services.common.errors import BadRecord, UnknownSchema

MARKER = b"\xc3\x01"
Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
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
    """Encodes records by schema name; decodes any known writer version.

    A released version the current schema can read by Avro's resolution rules
    (added fields with defaults, removed fields) needs nothing more. A breaking
    change registers an upcaster in ``services.common.upcast`` for the old
    version: the record is read with its own writer schema, upcast to the next
    version, and resolved from there, so every released version stays readable."""

    def __init__(self, schemas: dict[str, list[dict[str, Any]]],
                 upcasters: dict[tuple[str, int], Upcaster] | None = None) -> None:
        if upcasters is None:
            from services.common.upcast import UPCASTERS

            upcasters = UPCASTERS
        self._current: dict[str, Any] = {}
        self._header: dict[str, bytes] = {}
        self._by_version: dict[tuple[str, int], Any] = {}
        self._writers: dict[bytes, tuple[str, Any, tuple[int, Upcaster] | None]] = {}
        for name, versions in schemas.items():
            for i, raw in enumerate(versions):
                parsed = fastavro.parse_schema({k: v for k, v in raw.items() if k != "aios_version"})
                fp = struct.pack("<Q", crc64_avro(to_parsing_canonical_form(parsed).encode()))
                version: int | None = raw.get("aios_version")
                if version is not None:
                    self._by_version[(name, version)] = parsed
                up = upcasters.get((name, version)) if version is not None else None
                if fp not in self._writers or up is not None:
                    self._writers[fp] = (name, parsed, (version, up) if version is not None and up else None)
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
        name, writer_schema, upcast = writer
        try:
            if upcast is None:
                record = fastavro.schemaless_reader(io.BytesIO(value[10:]), writer_schema, self._current[name],
                                                    return_record_name=True, return_record_name_override=True)
            else:
                record = self._upcast(name, upcast, fastavro.schemaless_reader(
                    io.BytesIO(value[10:]), writer_schema, writer_schema,
                    return_record_name=True, return_record_name_override=True))
        except BadRecord:
            raise
        except Exception as exc:
            raise BadRecord(f"cannot decode {name} body: {exc}") from exc
        if not isinstance(record, dict):
            raise BadRecord(f"{name} body is not a record")
        at = record.get("occurred_at")
        if isinstance(at, dt.datetime):
            record["occurred_at"] = int(at.timestamp() * 1000)
        return name, record

    def _upcast(self, name: str, upcast: tuple[int, Upcaster], record: Any) -> Any:
        """Lift a record of a released version one version up, then decode it as that version."""
        version, fn = upcast
        newer = self._by_version.get((name, version + 1))
        if newer is None:
            raise BadRecord(f"{name} v{version} has an upcaster but no released v{version + 1} in schemas/history/")
        buf = io.BytesIO()
        buf.write(MARKER + struct.pack("<Q", crc64_avro(to_parsing_canonical_form(newer).encode())))
        fastavro.schemaless_writer(buf, newer, fn(record))
        return self.decode(buf.getvalue())[1]
