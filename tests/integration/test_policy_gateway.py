"""The planner's PolicyGateway against the real policy servicer (the repository's policies, Redis):
an API start's check carries the run's input and answers it masked, so the start asks policy once."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from infra.stack import Stack
from services.planner.ports import PolicyGateway
from services.planner.store import RunQueries
from services.planner.workflows import Registry
from tests.integration.mesh_servers import mesh_servers
from tests.unit.planner_twins import RecordingPublisher

pytestmark = pytest.mark.timeout(60)
RAW = {"email": "jane.roe@example.com", "note": "card 4111 1111 1111 1111, call +44 7700 900123"}


@pytest.fixture(scope="module")
def gateway(infra: Stack) -> Iterator[PolicyGateway]:
    """Plaintext (the tests' AIOS_GRPC_AUTH=none): the auth matrix covers the credentials. The
    servers close the client on the way out."""
    client = redis.Redis.from_url(infra.env()["AIOS_REDIS_URL"], decode_responses=True)
    with mesh_servers(client, Registry([]), RecordingPublisher(), RunQueries(client)) as found:
        yield PolicyGateway(found["policy"], timeout_s=10)


def test_a_start_check_with_the_runs_input_answers_it_masked(gateway: PolicyGateway) -> None:
    verdict = gateway.may_start("demo", "api:ann", "support-card-block", "", RAW)
    assert verdict.effect == "allow" and verdict.masked
    assert verdict.inputs["email"] == "j***@example.com"
    text = str(verdict.inputs)
    assert not [v for v in ("jane.roe", "4111 1111 1111 1111", "7700 900123") if v in text], text
    assert verdict.inputs == gateway.mask_many([("demo", RAW)])[0]  # the same masking as MaskInputs


def test_a_start_check_without_inputs_carries_none(gateway: PolicyGateway) -> None:
    verdict = gateway.may_start("demo", "api:ann", "support-card-block", "")
    assert verdict.effect == "allow" and not verdict.masked and verdict.inputs is None
