"""Request validation of the inference HTTP API and the Ray port layout: pure, no Ray."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.inference import contract
from services.inference.cluster import MAX_TEMP_DIR_CHARS, PORT_SPAN, RayPorts, temp_dir_for


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("latency_class", "tier"), [("interactive", "low_latency"), ("bulk", "high_throughput")])
def test_latency_class_picks_the_tier(latency_class: str, tier: str) -> None:
    parsed = contract.parse_request({"texts": ["hi"], "latency_class": latency_class})
    assert parsed.tier == tier and parsed.texts == ["hi"]


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("payload", "says"), [
    ({"texts": ["x"], "latency_class": "fast"}, '"interactive", "bulk"'),
    ({"texts": ["x"]}, "latency_class must be one of"),
    ({"latency_class": "bulk"}, '"texts" is missing'),
    ({"texts": [], "latency_class": "bulk"}, "empty"),
    ({"texts": "one", "latency_class": "bulk"}, "must be a list"),
    ({"texts": ["ok", 3], "latency_class": "bulk"}, '"texts"[1] is int'),
    ({"texts": ["x"] * 257, "latency_class": "bulk"}, "at most 256"),
    ({"texts": ["x" * 2001], "latency_class": "bulk"}, "limit is 2000"),
    (["not", "an", "object"], "JSON object"),
])
def test_bad_requests_say_what_to_fix(payload: object, says: str) -> None:
    with pytest.raises(contract.BadInput) as err:
        contract.parse_request(payload)
    assert says in str(err.value)


@pytest.mark.timeout(10)
def test_limits_are_inclusive() -> None:
    parsed = contract.parse_request({"texts": ["x" * 2000] * 256, "latency_class": "bulk"})
    assert len(parsed.texts) == 256


@pytest.mark.timeout(10)
def test_ray_ports_are_distinct_and_inside_the_span() -> None:
    ports = RayPorts(20000)
    named = list(ports.named().values())
    low, high = ports.worker_range
    assert len(set(named)) == len(named)
    assert all(20000 <= p < low for p in named)
    assert high == 20000 + PORT_SPAN - 1
    other = RayPorts(20000 + PORT_SPAN)
    assert min(other.named().values()) > high


@pytest.mark.timeout(10)
def test_temp_dir_stays_short_enough_for_ray_sockets(tmp_path: Path) -> None:
    assert temp_dir_for(Path("/r"), 16400) == Path("/r/ray-16400")
    long_dir = temp_dir_for(tmp_path / ("x" * 60), 16400)
    assert len(str(long_dir)) <= MAX_TEMP_DIR_CHARS and str(long_dir).endswith("16400")


def test_shared_client_and_service_contract_agree() -> None:
    """services never import each other, so the client keeps its own copy of the mapping."""
    from services.common import inference_client
    from services.inference import contract

    assert inference_client.TIERS_BY_LATENCY_CLASS == contract.TIERS_BY_LATENCY_CLASS
    assert inference_client.MAX_TEXTS == contract.MAX_TEXTS
