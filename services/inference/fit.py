"""Fit the intent classifier: ``python -m services.inference.fit``.

BANKING77 is split once, deterministically and per intent (seed 7): 20% is held
out and never seen by the fit; its rows go to ``.cache/banking77-holdout.csv``
so tests and benchmarks evaluate on the same unseen messages. The other 80% is
embedded with MiniLM and a logistic regression is fitted on the unit-norm
vectors. The result is cached with a version that hashes the data and the
parameters, so a second run with the same inputs does nothing.

The regularisation (C) was chosen on a validation slice carved from the
training part only, never on the held-out rows whose accuracy is reported."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from services.inference import model

Row = tuple[str, str]  # (text, category)

PARAMS: dict[str, Any] = {
    "split": {"seed": 7, "holdout_fraction": 0.2, "by": "category", "scheme": 1},
    "embedder": model.EMBEDDER_NAME,
    "normalized": True,
    "estimator": "LogisticRegression",
    "C": 10.0,
    "max_iter": 2000,
}


def data_dir() -> Path:
    """BANKING77 location (AIOS_BANKING77_DIR), default the copy vendored in ``tools/data/banking77``
    (CC BY 4.0, with its licence), so a fresh clone needs nothing else."""
    return Path(os.environ.get("AIOS_BANKING77_DIR") or model.REPO / "tools" / "data" / "banking77")


def read_rows(path: Path) -> list[Row]:
    with path.open(newline="", encoding="utf-8") as fh:
        return [(r["text"], r["category"]) for r in csv.DictReader(fh)]


def write_rows(path: Path, rows: Sequence[Row]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "category"])
        writer.writerows(rows)
    tmp.replace(path)


def stratified_split(rows: Sequence[Row], holdout_fraction: float = 0.2, seed: int = 7) -> tuple[list[Row], list[Row]]:
    """(train, holdout): ``holdout_fraction`` of every category held out.

    Deterministic and independent of input order (each category's texts are
    sorted before a seeded shuffle). A text is kept once (first label wins) so
    the same message can never sit on both sides."""
    by_category: dict[str, list[str]] = {}
    seen: set[str] = set()
    for text, category in rows:
        if text in seen:
            continue
        seen.add(text)
        by_category.setdefault(category, []).append(text)
    rng = random.Random(seed)
    train: list[Row] = []
    holdout: list[Row] = []
    for category in sorted(by_category):
        texts = sorted(by_category[category])
        rng.shuffle(texts)
        # At least one held out per category so every intent is evaluated.
        n_holdout = max(1, round(len(texts) * holdout_fraction)) if len(texts) > 1 else 0
        holdout.extend((t, category) for t in texts[:n_holdout])
        train.extend((t, category) for t in texts[n_holdout:])
    return train, holdout


def data_version(rows: Sequence[Row], params: dict[str, Any]) -> str:
    """Short hash of the data (order-free) and the fitting parameters."""
    digest = hashlib.sha256()
    for text, category in sorted(rows):
        digest.update(f"{category}\t{text}\n".encode())
    digest.update(json.dumps(params, sort_keys=True).encode())
    return digest.hexdigest()[:12]


def cached_version(path: Path) -> str | None:
    if not path.exists():
        return None
    import joblib

    try:
        return str(joblib.load(path).get("version"))
    except Exception:  # a truncated or foreign file is simply refitted
        return None


def fit_classifier(train: Sequence[Row], holdout: Sequence[Row], params: dict[str, Any]) -> dict[str, Any]:
    """Embed, fit, and measure held-out accuracy; returns the bundle to cache."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    encoder = model.load_encoder(threads=2)
    x_train = model.encode(encoder, [t for t, _ in train])
    x_holdout = model.encode(encoder, [t for t, _ in holdout])
    y_train = np.array([c for _, c in train])
    estimator = LogisticRegression(C=params["C"], max_iter=params["max_iter"])
    estimator.fit(x_train, y_train)
    predicted = estimator.predict(x_holdout)
    accuracy = float(np.mean(predicted == np.array([c for _, c in holdout])))
    return {
        "estimator": estimator,
        "labels": sorted(str(c) for c in estimator.classes_),
        "holdout_accuracy": round(accuracy, 4),
        "n_train": len(train),
        "n_holdout": len(holdout),
        "fitted_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "params": params,
        "model": model.CLASSIFIER_NAME,
        "embedder": model.EMBEDDER_NAME,
    }


def main() -> int:
    source = data_dir() / "train.csv"
    if not source.exists():
        print(f"error: BANKING77 not found at {source}; set AIOS_BANKING77_DIR to the folder holding train.csv",
              file=sys.stderr)
        return 2
    cache = model.cache_dir()
    rows = read_rows(source)
    split = PARAMS["split"]
    train, holdout = stratified_split(rows, split["holdout_fraction"], split["seed"])
    version = data_version(rows, PARAMS)
    target = model.classifier_path(cache)
    # The hold-out file is cheap and pure; rewrite it so it always matches the split.
    write_rows(model.holdout_path(cache), holdout)
    if cached_version(target) == version:
        print(f"intent classifier {model.CLASSIFIER_NAME}@{version} is up to date at {target}; nothing to do")
        return 0

    import joblib
    import torch

    torch.set_num_threads(2)
    started = time.monotonic()
    bundle = fit_classifier(train, holdout, PARAMS)
    bundle["version"] = version
    bundle["fit_seconds"] = round(time.monotonic() - started, 1)
    tmp = target.with_suffix(".tmp")
    joblib.dump(bundle, tmp)
    tmp.replace(target)  # atomic: a reader never sees a half-written model
    print(f"fitted {model.CLASSIFIER_NAME}@{version} on {len(train)} messages in {bundle['fit_seconds']} s; "
          f"held-out accuracy {bundle['holdout_accuracy']:.4f} on {len(holdout)} messages; saved to {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
