"""The BANKING77 split that the classifier is fitted and evaluated on: pure
functions, no model load."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from services.inference import fit

SOURCE = fit.data_dir() / "train.csv"


def _synthetic(n_categories: int = 7, per_category: int = 23) -> list[fit.Row]:
    return [(f"message {c}-{i}", f"intent_{c}") for c in range(n_categories) for i in range(per_category)]


@pytest.mark.timeout(10)
def test_split_is_deterministic_and_independent_of_row_order() -> None:
    rows = _synthetic()
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    assert fit.stratified_split(rows) == fit.stratified_split(rows)
    train_a, hold_a = fit.stratified_split(rows)
    train_b, hold_b = fit.stratified_split(shuffled)
    assert sorted(train_a) == sorted(train_b) and sorted(hold_a) == sorted(hold_b)


@pytest.mark.timeout(10)
def test_another_seed_gives_another_split() -> None:
    rows = _synthetic()
    assert fit.stratified_split(rows, seed=7)[1] != fit.stratified_split(rows, seed=8)[1]


@pytest.mark.timeout(10)
def test_split_is_stratified_and_disjoint_with_duplicates() -> None:
    rows = _synthetic() + [("message 0-1", "intent_5")]  # same text, conflicting label
    train, holdout = fit.stratified_split(rows, holdout_fraction=0.2)
    assert not {t for t, _ in train} & {t for t, _ in holdout}
    assert len(train) + len(holdout) == len(rows) - 1
    per_category = Counter(c for _, c in holdout)
    assert set(per_category) == {c for _, c in rows}
    assert all(count == round(23 * 0.2) for count in per_category.values())


@pytest.mark.timeout(60)
@pytest.mark.skipif(not SOURCE.exists(), reason=f"BANKING77 not at {SOURCE}")
def test_banking77_split_holds_out_a_fifth_of_every_intent() -> None:
    rows = fit.read_rows(SOURCE)
    split = fit.PARAMS["split"]
    train, holdout = fit.stratified_split(rows, split["holdout_fraction"], split["seed"])
    assert not {t for t, _ in train} & {t for t, _ in holdout}
    assert len(train) + len(holdout) == len({t for t, _ in rows})
    totals = Counter(c for _, c in rows)
    held = Counter(c for _, c in holdout)
    assert set(held) == set(totals) and len(totals) == 77
    for category, total in totals.items():
        assert abs(held[category] - total * 0.2) <= 1, category
    assert 0.19 <= len(holdout) / len(rows) <= 0.21


@pytest.mark.timeout(10)
def test_version_changes_with_data_or_params_but_not_row_order() -> None:
    rows = _synthetic()
    version = fit.data_version(rows, fit.PARAMS)
    assert version == fit.data_version(list(reversed(rows)), fit.PARAMS)
    assert version != fit.data_version(rows[:-1], fit.PARAMS)
    assert version != fit.data_version(rows, {**fit.PARAMS, "C": 1.0})
    assert len(version) == 12


@pytest.mark.timeout(10)
def test_holdout_file_round_trips(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rows = [("plain", "a"), ('with "quotes", commas', "b"), ("two\nlines", "c")]
    path = tmp_path / "holdout.csv"
    fit.write_rows(path, rows)
    assert fit.read_rows(path) == rows

