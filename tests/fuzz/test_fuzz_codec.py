"""The Avro decoder takes any bytes a producer can write: random bytes, a known header over random
bytes, and valid records of every schema with bytes flipped, cut or inserted. Each either decodes to
a record of a known schema or raises BadRecord (dead-lettered with its reason); nothing else."""

from __future__ import annotations

import fastavro
import pytest
from fastavro.utils import generate_many
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common.catalog import load_schemas
from services.common.codec import MARKER, AvroCodec
from services.common.errors import BadRecord
from tests.fuzz.conftest import EXAMPLES, examples

pytestmark = pytest.mark.timeout(300)
SCHEMAS = load_schemas()
CODEC = AvroCodec(SCHEMAS)
VALID = [CODEC.encode(name, record) for name, versions in sorted(SCHEMAS.items())
         for record in generate_many(fastavro.parse_schema(versions[0]), 3)]
HEADERS = sorted({v[:10] for v in VALID})
FUZZ = settings(max_examples=examples(400), deadline=1000, suppress_health_check=[HealthCheck.too_slow],
                derandomize=False)


def _decodes_or_refuses(data: bytes) -> None:
    EXAMPLES["avro decoder"] += 1
    try:
        name, record = CODEC.decode(data)
    except BadRecord as exc:
        assert str(exc), "a refusal says why"
        return
    assert name in SCHEMAS and isinstance(record, dict)


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes(data: bytes) -> None:
    _decodes_or_refuses(data)


@FUZZ
@given(st.sampled_from(HEADERS), st.binary(max_size=512))
def test_a_known_header_over_random_bytes(header: bytes, body: bytes) -> None:
    _decodes_or_refuses(header + body)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 6))):
        where = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["flip", "cut", "insert", "truncate"]))
        if op == "flip" and where < len(data):
            data[where] = draw(st.integers(0, 255))
        elif op == "cut" and where < len(data):
            del data[where:where + draw(st.integers(1, 8))]
        elif op == "insert":
            data[where:where] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[where:]
    return bytes(data)


@FUZZ
@given(mutated())
def test_mutated_valid_records(data: bytes) -> None:
    _decodes_or_refuses(data)


def test_the_valid_records_decode() -> None:
    assert all(CODEC.decode(v)[0] in SCHEMAS for v in VALID) and all(v[:2] == MARKER for v in VALID)
