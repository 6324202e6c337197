"""A saved head and its backbone applied to new images: top-k classes, or ``unknown`` far from every class.

A run's ``best/`` folder (written by ``compare``) holds the best head by validation score and an
open-set calibration: a distance score in embedding space and a threshold that accepts a stated
share (default 95 %) of in-distribution validation images. Images are preprocessed exactly as at
extraction: the recipe is read from the embeddings' provenance and the weights hash is checked.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featx.datasets import IMAGE_EXTENSIONS
from featx.errors import ConfigError, DataError
from featx.images import ImageError, Preprocess, load_image
from featx.store import file_sha256

log = logging.getLogger(__name__)
UNKNOWN = "unknown"
OPEN_SET_SCORES = ("knn", "centroid", "max_prob")
DEFAULT_SCORE = "knn"
REFERENCE_ROWS = 2000  # training rows kept for the kNN distance; enough for a stable 5-NN estimate
KNN = 5


def _normalise(X: np.ndarray) -> np.ndarray:
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


@dataclass
class OpenSet:
    """Scores that grow as an input leaves the training distribution, each with its calibrated threshold."""

    centroids: np.ndarray  # (classes, D), L2-normalised class means of L2-normalised train features
    reference: np.ndarray  # (<= REFERENCE_ROWS, D) L2-normalised train features
    thresholds: dict = field(default_factory=dict)
    coverage: float = 0.95

    def scores(self, features: np.ndarray, proba: np.ndarray) -> dict[str, np.ndarray]:
        unit = _normalise(features.astype(np.float32))
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
        unit = _normalise(X_train.astype(np.float32))
        centroids = _normalise(np.stack([unit[y_train == k].mean(axis=0) for k in np.unique(y_train)]))
        rows = np.random.default_rng(seed).permutation(len(unit))[:REFERENCE_ROWS]
        open_set = cls(centroids, unit[np.sort(rows)], coverage=coverage)
        val_scores = open_set.scores(X_val, proba_val)
        open_set.thresholds = {name: float(np.quantile(s, coverage)) for name, s in val_scores.items()}
        return open_set

    def save(self, folder: Path) -> None:
        np.savez_compressed(folder / "open_set.npz", centroids=self.centroids.astype(np.float32),
                            reference=self.reference.astype(np.float16))
        (folder / "open_set.json").write_text(json.dumps(
            {"thresholds": self.thresholds, "coverage": self.coverage, "default_score": DEFAULT_SCORE,
             "knn": KNN}, indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> "OpenSet":
        arrays = np.load(folder / "open_set.npz")
        info = json.loads((folder / "open_set.json").read_text())
        return cls(arrays["centroids"], arrays["reference"].astype(np.float32), info["thresholds"], info["coverage"])


def save_best(out: Path, model_file: Path, open_set: OpenSet, row: dict) -> Path:
    """``out/best/``: the best head by validation score, its open-set calibration, and why it was chosen."""
    best = out / "best"
    best.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_file, best / "head.joblib")
    open_set.save(best)
    (best / "chosen.json").write_text(json.dumps({k: v for k, v in row.items() if k != "model"}, indent=2,
                                                 default=float) + "\n")
    return best


@dataclass
class Prediction:
    path: str
    prediction: str | None
    top_k: list[tuple[str, float]]
    unknown_score: float | None = None
    error: str = ""

    def as_dict(self) -> dict:
        return {"path": self.path, "prediction": self.prediction,
                "top_k": [{"class": c, "probability": p} for c, p in self.top_k],
                "unknown_score": self.unknown_score, "error": self.error}


class Predictor:
    """Loads a ``best/`` folder (or any folder holding ``head.joblib``) and the backbone its head was trained on."""

    def __init__(self, folder: str | Path, score: str = DEFAULT_SCORE):
        from featx.heads import load_head

        folder = Path(folder)
        if (folder / "best" / "head.joblib").exists():
            folder = folder / "best"
        if not (folder / "head.joblib").exists():
            raise DataError(f"{folder}: no head.joblib; point at a run folder written by `featx compare --out`")
        if score not in OPEN_SET_SCORES:
            raise ConfigError(f"The 'score' parameter must be one of {', '.join(OPEN_SET_SCORES)}. "
                              f"Got {score!r} instead.")
        self.folder, self.score = folder, score
        self.head = load_head(folder / "head.joblib")
        self.meta = self.head["embeddings_meta"]
        if "parts" in self.meta:
            raise DataError(f"{folder}: this head uses the concatenated features of {self.meta['label']}; "
                            "predicting through several backbones at once is not supported yet")
        self.classes = self.head["classes"]
        self.open_set = OpenSet.load(folder) if (folder / "open_set.npz").exists() else None
        self.preprocess = Preprocess.from_dict(self.meta)
        self._model = None

    def model(self):
        """The feature model exactly as at extraction; refuses weights whose hash differs from the recorded one."""
        if self._model is None:
            from featx.backbones import create_feature_model, get_backbone, resolve_weights
            from featx.feature_model import optimise_for_cpu

            config = self.meta.get("config") or {}
            if config.get("checkpoint"):
                from featx.extraction import RANDOM_INIT
                from featx.finetune import read_checkpoint

                _, state = read_checkpoint(config["checkpoint"])
                model = create_feature_model(get_backbone(self.meta["backbone"]), RANDOM_INIT, self.meta["layer"])
                model.net.load_state_dict(state, strict=True)
                found = file_sha256(config["checkpoint"])
            else:
                spec = get_backbone(self.meta["backbone"])
                weights = resolve_weights(spec, config.get("weights"))
                model, found = create_feature_model(spec, weights, self.meta["layer"]), weights.sha256
            if found != self.meta["weights_sha256"]:
                raise DataError(f"{self.folder}: the head was trained on features of weights "
                                f"{self.meta['weights_sha256'][:12]}…, but the weights found now hash to "
                                f"{found[:12]}…; re-extract and retrain")
            self._model = optimise_for_cpu(model, self.preprocess.size)
        return self._model

    def features(self, pixels: np.ndarray) -> np.ndarray:
        import torch

        from featx.feature_model import embed

        model = self.model()
        batch = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
        with torch.inference_mode():
            out = embed(model, batch)
            if self.meta.get("tta"):
                out = (out + embed(model, batch.flip(3))) / 2
        # Round as the cache stored them, so the head sees the numbers it was trained on.
        return out.float().numpy().astype(self.meta.get("dtype", "float32")).astype(np.float32)

    def predict(self, paths: list[str | Path], top_k: int = 3, batch_size: int = 32) -> list[Prediction]:
        files = expand_inputs(paths)
        results: list[Prediction] = []
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            pixels, readable = [], []
            for path in chunk:
                try:
                    pixels.append(load_image(path, self.preprocess))
                    readable.append(path)
                except ImageError as err:
                    results.append(Prediction(str(path), None, [], error=str(err)))
            if readable:
                results += self._predict_pixels(readable, np.stack(pixels), top_k)
        order = {str(p): i for i, p in enumerate(files)}
        return sorted(results, key=lambda r: order[r.path])

    def _predict_pixels(self, paths, pixels, top_k) -> list[Prediction]:
        from featx.evaluate import predict_labels

        features = self.features(pixels)
        proba = self.head["pipeline"].predict_proba(features)
        chosen = predict_labels(proba, self.head.get("threshold"))
        unknown = self.open_set.scores(features, proba)[self.score] if self.open_set else None
        out = []
        for i, path in enumerate(paths):
            order = np.argsort(-proba[i])[:top_k]
            label = self.classes[chosen[i]]
            score = None if unknown is None else float(unknown[i])
            if score is not None and score > self.open_set.thresholds[self.score]:
                label = UNKNOWN
            out.append(Prediction(str(path), label, [(self.classes[k], float(proba[i, k])) for k in order], score))
        return out


def expand_inputs(paths: list[str | Path]) -> list[Path]:
    """Files as given, folders as every image under them (sorted); a missing path is a usage error."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.exists():
            files.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    if not files:
        raise DataError(f"no images in {', '.join(map(str, paths))}")
    return files
