"""Cedar policy files as the authorizer loads and reloads them: random text, Cedar token soup, and
the deployed policies with bytes and tokens changed. A file either loads (and then decides requests)
or is refused with PolicyFileError naming the file and its errors; a refused reload keeps the
previous set in force. Nothing else escapes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common.auth import Principal
from services.common.authz import Authorizer, PolicyFileError, resource_for
from tests.fuzz.conftest import EXAMPLES, examples

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parents[2]
POLICIES = (REPO / "policies" / "authz.cedar").read_text()
SCHEMA = REPO / "policies" / "authz.cedarschema"
FUZZ = settings(max_examples=examples(200), deadline=2000,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
TOKENS = ["permit", "forbid", "(", ")", "{", "}", "principal", "action", "resource", "when", "unless", ";", ",",
          "==", "!=", "in", "is", "has", "like", "&&", "||", "!", "if", "then", "else", "context", ".", "tenant",
          "Aios::User", "Aios::Action::\"ReadRun\"", "Aios::Tenant", "\"acme\"", "[", "]", "1", "-1",
          "9223372036854775807", "ip(\"1.2.3.4\")", "decimal(\"1.1\")", "@id(\"x\")", "containsAny", "\"*\"", "::",
          "roles", "tenants", "\\", "\"", "//", "/*", "*/", "\n"]
ALICE = Principal(kind="user", name="alice", tenants=frozenset({"acme"}), roles=frozenset({"viewer"}))


@pytest.fixture(scope="module")
def authorizer(tmp_path_factory: pytest.TempPathFactory) -> Authorizer:
    path = tmp_path_factory.mktemp("cedar") / "authz.cedar"
    path.write_text(POLICIES)
    return Authorizer(path, SCHEMA, reload_s=0)


def _loads_or_refuses(authorizer: Authorizer, text: str | bytes) -> None:
    """As a fresh load, then as a reload over the deployed set."""
    EXAMPLES["cedar policy files"] += 1
    if isinstance(text, str):
        assert all(isinstance(e, str) and e for e in authorizer.check(text))
    path = authorizer.policy_file
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    try:
        fresh = Authorizer(path, SCHEMA, reload_s=0)
    except PolicyFileError as exc:
        assert str(path) in str(exc)
    else:
        for action in ("ReadRun", "ApproveStep", "EraseSubject"):
            fresh.decide(ALICE, action, resource_for(action, tenant="acme", run_id="r1", subject="s"))
    before = authorizer._loaded.text
    st_ = path.stat()
    os.utime(path, ns=(st_.st_atime_ns, st_.st_mtime_ns + 1_000_000))  # a new stamp even within one tick
    if not authorizer.reload():
        assert authorizer._loaded.text == before  # refused (or the same): the previous set stays in force
    authorizer.decide(ALICE, "ReadRun", resource_for("ReadRun", tenant="acme"))


@FUZZ
@given(st.text(max_size=300))
def test_random_text(authorizer: Authorizer, text: str) -> None:
    _loads_or_refuses(authorizer, text)


@FUZZ
@given(st.lists(st.sampled_from(TOKENS), min_size=1, max_size=30).map(" ".join))
def test_cedar_token_soup(authorizer: Authorizer, text: str) -> None:
    _loads_or_refuses(authorizer, text)


@st.composite
def mutated_policies(draw: st.DrawFn) -> str:
    text = POLICIES
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["cut", "insert", "replace"]))
        if op == "cut":
            text = text[:where] + text[where + draw(st.integers(1, 20)):]
        elif op == "insert":
            text = text[:where] + draw(st.sampled_from(TOKENS)) + text[where:]
        else:
            text = text[:where] + draw(st.text(min_size=1, max_size=3)) + text[where + 1:]
    return text


@FUZZ
@given(mutated_policies())
def test_mutated_deployed_policies(authorizer: Authorizer, text: str) -> None:
    _loads_or_refuses(authorizer, text)


@FUZZ
@given(st.binary(max_size=100).map(lambda b: POLICIES.encode()[:200] + b))
def test_bytes_that_are_not_utf8(authorizer: Authorizer, data: bytes) -> None:
    _loads_or_refuses(authorizer, data)
