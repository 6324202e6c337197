"""Open-set scores: how far an input lies from everything seen in training, and thresholds calibrated on validation.

A run's best head answers ``unknown`` when the chosen score is above its threshold, which is set to
accept a stated share (default 95 %) of in-distribution validation images. No torch here.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featx.errors import DataError
from featx.store.neighbours import unit_rows
from featx.vocab import OPEN_SET_SCORES

DEFAULT_SCORE = "knn"
REFERENCE_ROWS = 2000  # training rows kept for the kNN distance; enough for a stable 5-NN estimate
KNN = 5


@dataclass
class OpenSet:
    """Scores that grow as an input leaves the training distribution, each with its calibrated threshold."""

    centroids: np.ndarray  # (classes, D), L2-normalised class means of L2-normalised train features
    reference: np.ndarray  # (<= REFERENCE_ROWS, D) L2-normalised train features
    thresholds: dict = field(default_factory=dict)
    coverage: float = 0.95

    def scores(self, features: np.ndarray, proba: np.ndarray) -> dict[str, np.ndarray]:
        unit = unit_rows(features.astype(np.float32))
        similarity = unit @ self.reference.T.astype(np.float32)
        k = min(KNN, similarity.shape[1])
        nearest = -np.sort(-similarity, axis=1)[:, :k]
        return {
            "knn": 1.0 - nearest.mean(axis=1),
            "centroid": 1.0 - (unit @ self.centroids.T).max(axis=1),
            "max_prob": 1.0 - proba.max(axis=1),
        }

    @classmethod
    def calibrate(cls, X_train, y_train, X_val, proba_val, coverage: float = 0.95, seed: int = 0) -> "OpenSet":
        """Thresholds at the ``coverage`` quantile of validation scores: that share of known images is accepted."""
        unit = unit_rows(X_train.astype(np.float32))
        centroids = unit_rows(np.stack([unit[y_train == k].mean(axis=0) for k in np.unique(y_train)]))
        rows = np.random.default_rng(seed).permutation(len(unit))[:REFERENCE_ROWS]
        open_set = cls(centroids, unit[np.sort(rows)], coverage=coverage)
        val_scores = open_set.scores(X_val, proba_val)
        open_set.thresholds = {name: float(np.quantile(s, coverage)) for name, s in val_scores.items()}
        return open_set

    def save(self, folder: Path) -> None:
        """``open_set.npz`` (centroids, reference rows) and ``open_set.json`` (thresholds) in ``folder``."""
        np.savez_compressed(folder / "open_set.npz", centroids=self.centroids.astype(np.float32),
                            reference=self.reference.astype(np.float16))
        (folder / "open_set.json").write_text(json.dumps(
            {"thresholds": self.thresholds, "coverage": self.coverage, "default_score": DEFAULT_SCORE,
             "knn": KNN}, indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> "OpenSet | None":
        """The calibration saved in ``folder``, or None where there is none; damage is one line."""
        if not (folder / "open_set.npz").exists():
            return None
        try:
            with np.load(folder / "open_set.npz", allow_pickle=False) as arrays:
                centroids, reference = arrays["centroids"], arrays["reference"].astype(np.float32)
            info = json.loads((folder / "open_set.json").read_text())
            thresholds = {name: float(info["thresholds"][name]) for name in OPEN_SET_SCORES}
            return cls(centroids, reference, thresholds, float(info["coverage"]))
        except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as err:
            raise DataError(f"{folder}: damaged open-set calibration ({type(err).__name__}: {str(err)[:100]}); "
                            "re-run `featx compare --out`") from None
