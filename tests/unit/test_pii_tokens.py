"""Reversible per-tenant PII tokens: sealed by policy for the fields its pii
block names, opened only by the executor's toolbox, for the step's tenant, for
the inputs a connector declares, and sealed again in the connector's answer."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.errors import ConfigError, PermanentError
from services.common.pii_tokens import InvalidToken, TokenVault, is_token, write_master_key
from services.executor.adapters.toolbox import Call, Toolbox
from services.policy.domain.masking import mask_text, mask_value
from services.policy.domain.model import PiiSpec
from services.policy.domain.parse import parse_policy_file

VAULT = TokenVault(bytes(range(32)))
PII = PiiSpec(frozenset({"email"}), ("email", "card_number", "phone", "iban"), frozenset({"card_id"}))


def test_a_token_opens_for_its_tenant_only() -> None:
    token = VAULT.seal("t1", "4111111111111111")
    assert is_token(token) and "4111" not in token
    assert VAULT.open("t1", token) == "4111111111111111"
    assert VAULT.seal("t1", "4111111111111111") != token  # a fresh nonce each time: equal values do not show
    with pytest.raises(InvalidToken, match="another tenant"):
        VAULT.open("t2", token)
    altered = token[:-3] + ("a" if token[-3] != "a" else "b") + token[-2:]
    with pytest.raises(InvalidToken):
        VAULT.open("t1", altered)
    with pytest.raises(InvalidToken):
        TokenVault(secrets.token_bytes(32)).open("t1", token)
    assert VAULT.open("t1", VAULT.seal("t1", {"n": 1})) == {"n": 1}  # any JSON value, type kept


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30), st.sampled_from(["", " ", "card ", "(", "+", "a@b.co "]))
def test_masking_text_never_breaks_a_token(value: str, before: str) -> None:
    token = VAULT.seal("t1", value)
    assert mask_text(f"{before}{token} 4111 1111 1111 1111", PII.mask_patterns).startswith(
        mask_text(before, PII.mask_patterns) + token)


def test_tokenize_fields_are_sealed_and_stay_sealed() -> None:
    data = {"card_id": "card-9f3a", "email": "ann@x.io", "text": "card 4111 1111 1111 1111"}
    once = mask_value(data, PII, lambda v: VAULT.seal("t1", v))
    assert is_token(once["card_id"]) and VAULT.open("t1", once["card_id"]) == "card-9f3a"
    assert once["email"] == "a***@x.io" and once["text"] == "card **** **** **** 1111"
    assert mask_value(once, PII, lambda v: VAULT.seal("t1", v)) == once  # the planner's step re-check
    assert mask_value(data, PII)["card_id"] == "***"  # no key: hidden, never passed on
    assert mask_value({"card_id": "ptok_4111111111111111"}, PII)["card_id"] == "***"  # not a token's shape


def test_a_field_is_either_masked_or_tokenized() -> None:
    with pytest.raises(ConfigError, match="also listed in mask_fields"):
        parse_policy_file({"id": "p", "version": 1, "pii": {"mask_fields": ["card_id"],
                                                             "tokenize_fields": ["card_id"]}}, "p.yaml")
    parsed = parse_policy_file({"id": "p", "version": 1, "pii": {"tokenize_fields": ["Card_ID"]}}, "p.yaml")
    assert parsed.pii.tokenize_fields == frozenset({"card_id"})


def test_key_file(tmp_path: Path) -> None:
    path = write_master_key(tmp_path / "pii" / "master.key")
    assert path.stat().st_mode & 0o777 == 0o600
    assert write_master_key(path).read_text() == path.read_text()  # kept, not replaced
    vault = TokenVault.from_file(path)
    assert vault.open("t", vault.seal("t", "x")) == "x"
    (tmp_path / "bad").write_text("nothex")
    with pytest.raises(ConfigError, match="AIOS_PII_KEY_FILE=.*64 hex digits"):
        TokenVault.from_file(tmp_path / "bad")
    with pytest.raises(ConfigError, match="cannot read"):
        TokenVault.from_file(tmp_path / "missing")


# -- the connector boundary --------------------------------------------------------------
@dataclass(frozen=True)
class Tool:
    connector: str
    detokenize: tuple[str, ...] = ()


class Bank:
    """A stand-in for the bank's API: records what it received, echoes the card id."""

    def __init__(self) -> None:
        self.tools = {"bank.block_card": Tool("bank", ("card_id",)), "messages.send": Tool("messages")}
        self.received: list[tuple[str, dict[str, Any]]] = []

    def call(self, tool_name: str, inputs: dict[str, Any], idempotency_key: str, timeout_s: float) -> Any:
        self.received.append((tool_name, inputs))
        if inputs.get("customer_id") == "unknown":
            raise PermanentError(f"{tool_name}: HTTP 404: no card {inputs.get('card_id')}")
        return {"card_id": inputs.get("card_id"), "status": "blocked", "note": f"card {inputs.get('card_id')} ok"}


def _call(tenant: str) -> Call:
    return Call(tenant=tenant, run_id="r", step_id="s", attempt=1, idempotency_key="r:s", latency_class="normal",
                timeout_s=5.0)


def test_only_a_declaring_connector_gets_the_value_and_its_answer_is_sealed_again() -> None:
    bank = Bank()
    box = Toolbox(connectors=bank, vault=VAULT)
    token = VAULT.seal("t1", "card-9f3a")
    result = box.run("bank.block_card", {"card_id": token, "customer_id": "c"}, _call("t1"))
    assert bank.received[-1] == ("bank.block_card", {"card_id": "card-9f3a", "customer_id": "c"})
    assert result.output == {"card_id": token, "status": "blocked", "note": f"card {token} ok"}
    box.run("messages.send", {"card_id": token, "body": f"card {token}"}, _call("t1"))
    assert bank.received[-1] == ("messages.send", {"card_id": token, "body": f"card {token}"})
    with pytest.raises(PermanentError) as err:
        box.run("bank.block_card", {"card_id": token, "customer_id": "unknown"}, _call("t1"))
    assert str(err.value) == f"bank.block_card: HTTP 404: no card {token}"  # an error quoting it is sealed too
    with pytest.raises(InvalidToken):
        box.run("bank.block_card", {"card_id": token}, _call("t2"))
    with pytest.raises(Exception, match="no PII key"):
        Toolbox(connectors=bank).run("bank.block_card", {"card_id": token}, _call("t1"))
