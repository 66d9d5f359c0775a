"""Streams of real BANKING77 intents for the drift tests: the vendored training split's labels in a
seeded order (the natural mix), or only those of a few intents (a shifted mix). The confidences are
drawn, seeded, from one Beta distribution (mean 0.8) unless a test lowers them: the classifier is
not run here, so the tests stay fast and exact."""

from __future__ import annotations

import csv
import random
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "tools" / "data" / "banking77" / "train.csv"
# Five intents a shifted stream keeps (a burst of card trouble, e.g. after an outage).
SHIFTED_INTENTS = ("card_not_working", "declined_card_payment", "card_payment_not_recognised",
                   "lost_or_stolen_card", "compromised_card")


def labels() -> list[str]:
    with TRAIN.open(newline="", encoding="utf-8") as fh:
        return [row["category"] for row in csv.DictReader(fh)]


def stream(n: int, *, seed: int, only: tuple[str, ...] = (), confidence: tuple[float, float] = (8.0, 2.0)
           ) -> list[tuple[str, float]]:
    """``n`` (intent, confidence) pairs: rows of the training split drawn with a seeded RNG (with
    replacement), optionally only rows of the intents ``only``; confidences Beta(a, b)."""
    rng = random.Random(seed)
    pool = [label for label in labels() if not only or label in only]
    assert pool, f"no rows of {only}"
    return [(rng.choice(pool), rng.betavariate(*confidence)) for _ in range(n)]
