"""What a remedy is: a step between the cached features and a head's decision that reads no test label.

A remedy is fitted where ``compare`` runs and replayed where the run is used (``predict``, and later ``serve``
and ``export``). Each implements one of three stages:

- ``features``: fitted on one input's train, val and (unlabelled) test features; maps train and val
  (``source``) and the test and new images' features (``target``) before any head is fitted;
- ``scores``: fitted on one head's validation and test probabilities; ``replay`` changes the probabilities or
  the decision threshold of the test images, and of new images in ``predict``, by the same function;
- ``extraction``: made when the features were embedded (``featx extract``); the run records it and the
  predictor's backbone embeds new images the same way.

A remedy that cannot be replayed image by image (its answer for one image depends on the others scored with
it) says so with ``replayable = False`` and ``not_replayable``: the leaderboard marks its rows, and predict
says it in one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np

STAGES = ("extraction", "features", "scores")
MIN_TARGET_ROWS = 10  # fewer target images than this say too little about their distribution to adapt to


@dataclass(frozen=True)
class Split:
    """The labelled, readable rows of one split of one input, in the file's order: what a head is fitted or
    scored on. Train's rows include augmented copies (their paths are then those of the images only)."""

    features: np.ndarray
    labels: np.ndarray
    paths: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def with_features(self, features: np.ndarray) -> "Split":
        return replace(self, features=features)


@dataclass(frozen=True)
class Splits:
    """One input's train, val and test ``Split`` (test None when the file has none), and where val came from."""

    train: Split
    val: Split
    test: Split | None
    val_source: str


@dataclass(frozen=True)
class Scores:
    """One head's probabilities on validation (whose labels it may read) and test (whose labels it never sees),
    the features they were made from, and the decision thresholds: validation's, and the one applied on test."""

    val: np.ndarray
    val_labels: np.ndarray
    val_features: np.ndarray
    test: np.ndarray | None
    test_features: np.ndarray | None
    threshold: float | None = None
    test_threshold: float | None = None


@dataclass
class Fitted:
    """A remedy fitted on one input (features stage) or on one head's scores (scores stage).

    ``replay`` is what predict needs to do it again (plain JSON, saved with the head); ``record`` what run.json
    and the report show (measured effects and counts), with ``summary``, one sentence for a reader; ``state``
    what only compare needs (a fitted map), never saved; ``unscored`` test rows the leaderboard leaves out.
    """

    name: str
    replay: dict = field(default_factory=dict)
    record: dict = field(default_factory=dict)
    summary: str = ""
    state: Any = None
    unscored: np.ndarray | None = None

    def recorded(self) -> dict:
        return {**self.record, "summary": self.summary}


@dataclass(frozen=True)
class Context:
    """What a remedy may read besides the split it fits on: every compare option (``options``), the seed, the
    input's name and class names, and its train / val / test splits as the heads see them."""

    where: str
    classes: list[str]
    options: dict
    seed: int
    splits: Splits


class Remedy:
    """The protocol every remedy implements (subclass it and register an instance with
    ``featx.shift.remedies.register_remedy``).

    ``name`` keys the registry, run.json and the saved head; ``parameter`` is the compare option that asks for
    it (a key of ``vocab.PARAMETERS``; ``wanted`` says which of its values do).
    """

    name: ClassVar[str] = ""
    parameter: ClassVar[str] = ""
    stage: ClassVar[str] = "features"
    replayable: ClassVar[bool] = True
    not_replayable: ClassVar[str] = ""  # why, where ``replayable`` is False
    needs_test: ClassVar[bool] = True  # fitted on the test images (no labels), so compare needs a test split
    before_threshold: ClassVar[bool] = False  # scores stage: validation's threshold is chosen on its output
    not_exportable: ClassVar[str] = ""  # why `featx export` cannot put it in an ONNX graph, where it cannot

    def wanted(self, value) -> bool:
        return value not in (None, False, 0, "none", "off")

    # features stage
    def fit(self, value, context: Context) -> Fitted:
        raise NotImplementedError

    def source(self, fitted: Fitted, X: np.ndarray) -> np.ndarray:
        """Train and val features as the heads are fitted on them."""
        return X

    def target(self, replay: dict, X: np.ndarray) -> np.ndarray:
        """Test and new images' features as the heads score them (from the saved ``replay`` alone)."""
        return X

    def scored_without(self, fitted: Fitted, row: dict, with_all: dict) -> None:
        """Write into the leaderboard ``row`` what the test figures were with the ``unscored`` rows kept."""

    # scores stage
    def fit_scores(self, value, scores: Scores, context: Context) -> Fitted:
        raise NotImplementedError

    def on_validation(self, fitted: Fitted, scores: Scores) -> np.ndarray:
        """Validation's probabilities after the remedy (unchanged unless it also spreads validation's)."""
        return scores.val

    def replay_scores(self, replay: dict, features: np.ndarray, proba: np.ndarray,
                      threshold: float | None) -> tuple[np.ndarray, float | None]:
        """The test images' (in compare) and new images' (in predict) probabilities and decision threshold."""
        return proba, threshold

    def reweighting(self, replay: dict) -> np.ndarray | None:
        """For ``featx export``: per-class factors ``replay_scores`` multiplies the probabilities by before it
        renormalises them (None: it leaves them as they are; the threshold it sets is read from it directly)."""
        return None

    # extraction stage
    def in_effect(self, config: dict):
        """The value this remedy had in an extraction's recorded config (``None``: not used)."""
        return config.get(self.parameter)

    def describe(self, value) -> str:
        """One sentence for the report on how an extraction used it."""
        return f"{self.name}: {value}"
