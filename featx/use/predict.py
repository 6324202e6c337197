"""A run's best head and its backbone applied to new images: top-k classes, or ``unknown`` far from every class.

Images are preprocessed exactly as at extraction: the recipe is read from the embeddings'
provenance saved with the head, and the weights' hash is checked before anything runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from featx.shift.audit import MIN_ROWS, SHIFT_AUC, ShiftTest, two_sample_test
from featx.shift.remedies import check_steps, replay_features, replay_scores
from featx.data.augment import fixed_views
from featx.embed.checkpoints import backbone_source
from featx.data.datasets import list_images
from featx.errors import ConfigError, DataError
from featx.embed.feature_model import FeatureModel, adapt_batchnorm, autocast, build_feature_model, embed, optimise_for_cpu, to_tensor
from featx.embed.hardware import resolve_precision
from featx.heads.registry import load_head
from featx.data.images import ImageError, Preprocess, load_image
from featx.heads.metrics import predict_labels
from featx.heads.openset import DEFAULT_SCORE, OpenSet
from featx.embed.planning import ADAPT_BN_BATCH, ADAPT_BN_MIN_IMAGES, adaptation_sample
from featx.comparison.runs import best_head
from featx.vocab import check

log = logging.getLogger(__name__)
UNKNOWN = "unknown"


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


class Backbone:
    """One backbone a head's features come from: its model, built exactly as at extraction, and its preprocessing.

    It runs on the CPU in the precision the extraction recorded (bf16 where that was it and the CPU computes it
    natively): features from another precision differ enough for the drift check to call them another domain.
    An ``--adapt-bn`` one takes its BatchNorm statistics from new images (see ``Predictor``).
    """

    def __init__(self, folder: Path, meta: dict):
        self.folder, self.meta = folder, meta
        self.preprocess = Preprocess.from_dict(meta)
        config = meta.get("config") or {}
        self.adapts_bn = bool(config.get("adapt_bn"))
        # the extraction's test-time views: the same fixed draws, so new images' features are made as its rows were
        self.views = fixed_views(config.get("aug", "natural"), self.preprocess.size, config.get("tta_views", 0))
        self.precision = "fp32"  # resolved when the model is built
        self.architecture = ""
        self._model = None

    def model(self, adapt_to: list[Path] = ()):
        """The feature model, built the first time (an ``--adapt-bn`` one with the statistics of ``adapt_to``);
        refuses weights whose hash differs from the recorded one."""
        if self._model is None:
            model = self.eager_model()
            if self.adapts_bn:
                adapt_batchnorm(model, self._adaptation_batches(list(adapt_to)))
            self.precision = resolve_precision(self.meta.get("precision", "fp32"), "cpu", self.architecture)[0]
            self._model = optimise_for_cpu(model, self.preprocess.size, self.precision)
        return self._model

    def eager_model(self) -> FeatureModel:
        """The feature model as extraction built it, before any CPU optimisation; refuses weights whose hash
        differs from the recorded one."""
        config = self.meta.get("config") or {}
        source = backbone_source(self.meta["backbone"], config.get("weights"), config.get("checkpoint"))
        if source.weights.sha256 != self.meta["weights_sha256"]:
            raise DataError(f"{self.folder}: the head was trained on features of weights "
                            f"{self.meta['weights_sha256'][:12]}…, but the weights found now hash to "
                            f"{source.weights.sha256[:12]}…; re-extract and retrain")
        self.architecture = source.spec.architecture
        return build_feature_model(source.spec, source.weights, self.meta["layer"], source.backbone_state()).eval()

    def _adaptation_batches(self, files: list[Path]) -> list[torch.Tensor]:
        """Readable images of a seeded sample of ``files``, in batches, as the extraction sampled each split's."""
        pixels = []
        for path in adaptation_sample(files):
            try:
                pixels.append(load_image(path, self.preprocess))
            except ImageError:
                pass  # reported per file when it is classified
        if len(pixels) < ADAPT_BN_MIN_IMAGES:
            raise DataError(f"{self.folder}: its features were embedded with BatchNorm statistics of their own images "
                            f"(--adapt-bn), and new images need theirs: at least {ADAPT_BN_MIN_IMAGES} readable ones, "
                            f"{len(pixels)} given; classify more at once, or name a folder of them with --adapt-to")
        return [to_tensor(np.stack(pixels[i:i + ADAPT_BN_BATCH])) for i in range(0, len(pixels), ADAPT_BN_BATCH)]

    def features(self, pixels: np.ndarray) -> np.ndarray:
        model = self.model()
        with torch.inference_mode(), autocast(torch.device("cpu"), self.precision):
            out = embed(model, to_tensor(pixels), tta=bool(self.meta.get("tta")), views=self.views)
        # Round as the cache stored them, so the head sees the numbers it was trained on.
        return out.float().numpy().astype(self.meta.get("dtype", "float32")).astype(np.float32)


class Predictor:
    """Loads a run's best head (``RUN/best``, or a folder holding ``head.json``) and the backbones it was trained on.

    ``trust`` is needed only for heads of older featx saved as joblib pickles, which run code when loaded.
    A head on several backbones' features (``compare --concat`` or ``--ensemble``) embeds each image with each
    backbone, as its files were made, and joins the features side by side.
    A run extracted with ``--adapt-bn`` embedded every split with BatchNorm statistics of its own images, so
    new images are embedded with statistics of new images too: of ``adapt_to`` (files or folders of unlabelled
    images of the new domain) or else of the first ``predict`` call's images; kept for later calls. The remedies
    the run's compare fitted are replayed around the head as on its test images (``featx.shift.remedies``); one
    that cannot be replayed image by image (``--smooth-test``) is said in one line when the run is loaded.
    """

    def __init__(self, folder: str | Path, score: str = DEFAULT_SCORE, trust: bool = False,
                 adapt_to: list[str | Path] | None = None):
        check("Predictor", score=score)
        head_file = best_head(folder)
        self.folder, self.score = head_file.parent, score
        self.head = load_head(head_file, trust=trust)
        self.meta = self.head["embeddings_meta"]
        if "parts" in self.meta and "part_meta" not in self.meta:
            raise DataError(f"{self.folder}: this head uses the features of several backbones "
                            f"({self.meta['label']}) and was saved by an older featx that did not record how each "
                            "was made; run `featx compare` again")
        self.backbones = [Backbone(self.folder, meta) for meta in self.meta.get("part_meta") or [self.meta]]
        if adapt_to and not any(b.adapts_bn for b in self.backbones):
            raise ConfigError(f"{self.folder}: adapting BatchNorm statistics is for runs extracted with --adapt-bn; "
                              "this run's features use the pretrained statistics")
        self.adapt_to = list_images(adapt_to) if adapt_to else None
        self.classes = self.head["classes"]
        self.steps = head_steps(self.head)
        check_steps(self.steps, str(self.folder))
        self.open_set = OpenSet.load(self.folder)
        self._seen: list[np.ndarray] = []

    def features(self, paths: list[Path | tuple[str, bytes]]) -> tuple[list, np.ndarray | None, list[Prediction]]:
        """The readable images among ``paths`` (files, or (name, bytes) of uploads), their features (every
        backbone's, side by side), and a ``Prediction`` with the error for each unreadable one. Each backbone
        decodes the file itself: JPEG draft decoding depends on the size it resizes to, and each must see the
        pixels its extraction saw."""
        readable, failed, pixels = [], [], [[] for _ in self.backbones]
        for path in paths:
            name, source = path if isinstance(path, tuple) else (str(path), path)
            try:
                loaded = [load_image(source, b.preprocess) for b in self.backbones]
            except ImageError as err:
                failed.append(Prediction(name, None, [], error=str(err)))
                continue
            readable.append(path)
            for kept, image in zip(pixels, loaded):
                kept.append(image)
        if not readable:
            return readable, None, failed
        return readable, np.hstack([b.features(np.stack(p)) for b, p in zip(self.backbones, pixels)]), failed

    def predict(self, paths: list[str | Path], top_k: int = 3, batch_size: int = 32) -> list[Prediction]:
        """Files, and every image under folders, in that order."""
        return self.classify(list_images(paths), top_k, batch_size)

    def predict_frame(self, paths: list[str | Path], batch_size: int = 32):
        """``predict`` as a DataFrame, one row per image: path, prediction, unknown_score, error, and each class's
        probability in a column named after the class (empty for an image that could not be read)."""
        try:
            import pandas as pd
        except ImportError:
            raise ConfigError("Predictor.predict_frame needs pandas: pip install 'featx[pandas]'") from None
        results = self.predict(paths, top_k=len(self.classes), batch_size=batch_size)
        frame = pd.DataFrame({"path": [r.path for r in results], "prediction": [r.prediction for r in results],
                              "unknown_score": [r.unknown_score for r in results],
                              "error": [r.error for r in results]})
        probabilities = [dict(r.top_k) for r in results]
        for name in self.classes:
            frame[name] = [p.get(name, float("nan")) for p in probabilities]
        return frame

    def classify(self, files: list[Path | tuple[str, bytes]], top_k: int = 3, batch_size: int = 32,
                 score: str | None = None) -> list[Prediction]:
        """``files`` (paths, or (name, bytes) of uploads) in their order, unreadable ones with their error;
        ``unknown`` decided by ``score`` (the predictor's by default)."""
        check("Predictor.predict", top_k=top_k, batch_size=batch_size, score=score or self.score)
        for backbone in self.backbones:  # built (and adapted, for an --adapt-bn run) before the first batch
            backbone.model(self.adapt_to or [f for f in files if not isinstance(f, tuple)])
        results: list[Prediction] = []
        self._seen = []  # this call's features, for drift() and the spreading
        readable = []
        for start in range(0, len(files), batch_size):
            read, features, failed = self.features(files[start:start + batch_size])
            results += failed
            readable += read
            if read:
                self._seen.append(features)
        if readable:
            results += self._classify([_name(p) for p in readable], np.concatenate(self._seen), top_k,
                                      score or self.score)
        order = {_name(p): i for i, p in enumerate(files)}
        return sorted(results, key=lambda r: order[r.path])

    def drift(self) -> ShiftTest | None:
        """How far the images of the last ``predict`` call are from the training images (a drift check without
        labels: the audit's two-sample test against the training rows the run keeps for its open-set scores).
        None when the run keeps none or fewer than ``audit.MIN_ROWS`` images were read."""
        if not self.open_set or sum(map(len, self._seen)) < MIN_ROWS:
            return None
        batch = np.concatenate(self._seen)
        unit = batch / np.linalg.norm(batch, axis=1, keepdims=True)
        return two_sample_test(self.open_set.reference, unit, permute_above=SHIFT_AUC)  # permutations only if it matters

    def _classify(self, paths, features, top_k, score_name) -> list[Prediction]:
        features, proba, threshold = head_probabilities(self.head, features, self.steps)
        chosen = predict_labels(proba, threshold)
        unknown = self.open_set.scores(features, proba)[score_name] if self.open_set else None
        out = []
        for i, path in enumerate(paths):
            order = np.argsort(-proba[i])[:top_k]
            label = self.classes[chosen[i]]
            score = None if unknown is None else float(unknown[i])
            if score is not None and score > self.open_set.thresholds[score_name]:
                label = UNKNOWN
            out.append(Prediction(str(path), label, [(self.classes[k], float(proba[i, k])) for k in order], score))
        return out


def head_probabilities(head: dict, features: np.ndarray, steps: list[dict] | None = None):
    """A loaded head applied to features with the run's remedies replayed (``steps``, the head's own by default):
    the features as the head scores them, its class probabilities and the decision threshold. For the run's own
    test images, what the leaderboard scored."""
    steps = head_steps(head) if steps is None else steps
    features = replay_features(steps, features)
    proba = head["pipeline"].predict_proba(features)
    proba, threshold = replay_scores(steps, features, proba, validation_threshold(head))
    return features, proba, threshold


def _name(source: Path | tuple[str, bytes]) -> str:
    return source[0] if isinstance(source, tuple) else str(source)


def validation_threshold(head: dict) -> float | None:
    """The decision threshold chosen on validation, which the run's remedies start from (heads saved before featx
    kept it apart have only ``threshold``)."""
    return head["validation_threshold"] if "validation_threshold" in head else head.get("threshold")


def head_steps(head: dict) -> list[dict]:
    """The remedies a loaded head replays; for a head saved before featx recorded them, ``--smooth-test`` (the
    only one replayed then)."""
    if head.get("remedies"):
        return head["remedies"]
    neighbours = head.get("smooth_test") or 0
    return [{"name": "smooth_test", "stage": "scores", "replay": {"neighbours": neighbours}}] if neighbours else []
