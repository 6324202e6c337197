"""``--threshold mixture``: a binary decision threshold where the test images' own scores part into two groups.

Validation keeps the threshold chosen on it (for balanced accuracy); the test images get the cut of their own
scores where the same rule on validation costs little. Predict applies the saved cut to new images.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit, logit
from sklearn.metrics import balanced_accuracy_score
from sklearn.mixture import GaussianMixture

from featx.shift.remedy import MIN_TARGET_ROWS, Context, Fitted, Remedy, Scores

MIXTURE_TOLERANCE = 0.02  # validation balanced accuracy the mixture cut may lose against validation's own threshold


def mixture_threshold(p_positive: np.ndarray) -> float | None:
    """The probability at which a two-component Gaussian mixture over the logits of ``p_positive`` changes from
    its lower component to its higher one: where one set of images' scores part into two groups, whatever the
    head learnt its threshold from. None with fewer than 10 rows, or where the two components coincide; whether
    the cut is a good one is for ``target_threshold``'s check on validation to say."""
    if len(p_positive) < MIN_TARGET_ROWS:
        return None
    scores = logit(np.clip(p_positive, 1e-6, 1 - 1e-6))[:, None]
    mixture = GaussianMixture(2, n_init=3, random_state=0).fit(scores)
    low, high = np.argsort(mixture.means_.ravel())
    grid = np.linspace(mixture.means_[low, 0], mixture.means_[high, 0], 512)[:, None]
    parted = np.flatnonzero(mixture.predict_proba(grid)[:, high] >= 0.5)
    if mixture.means_[high, 0] - mixture.means_[low, 0] < 1e-3 or not len(parted):
        return None
    return float(expit(grid[parted[0], 0]))


def target_threshold(p_val: np.ndarray, y_val: np.ndarray, val_threshold: float, p_target: np.ndarray) -> dict:
    """The binary decision threshold for the target images from their own scores (``mixture_threshold``), kept
    where the same rule on validation costs at most ``MIXTURE_TOLERANCE`` of balanced accuracy against
    validation's own threshold (a head whose scores do not form two groups is left with that one)."""
    found = {"method": "mixture", "applied": False, "value": val_threshold}
    on_val = mixture_threshold(p_val[:, 1])
    if on_val is None:
        return {**found, "refused": "validation scores do not part into two groups"}
    cost = (balanced_accuracy_score(y_val, p_val[:, 1] >= val_threshold)
            - balanced_accuracy_score(y_val, p_val[:, 1] >= on_val))
    found["validation_cost"] = round(float(cost), 4)
    cut = mixture_threshold(p_target[:, 1])
    if cut is None:
        return {**found, "refused": "the target scores do not part into two groups"}
    if cost > MIXTURE_TOLERANCE:
        return {**found, "refused": f"on validation the mixture cut costs {cost:.3f} of balanced accuracy"}
    share = float((p_target[:, 1] >= cut).mean())
    return {**found, "applied": True, "value": cut, "target_positive_share": round(share, 4)}


class MixtureThreshold(Remedy):
    name, parameter = "mixture_threshold", "threshold"
    stage = "scores"

    def wanted(self, value) -> bool:
        return value == "mixture"

    def fit_scores(self, value, scores: Scores, context: Context) -> Fitted:
        if scores.threshold is None:  # more than two classes: compare warns that it decides by argmax
            return Fitted(self.name, record={"applied": False, "refused": "a decision threshold needs two classes"},
                          summary="not applied: a decision threshold needs two classes")
        found = target_threshold(scores.val, scores.val_labels, scores.threshold, scores.test)
        summary = (f"test threshold {found['value']:.4f}, where the test images' own scores part into two groups"
                   if found["applied"] else f"validation's threshold kept ({found['refused']})")
        return Fitted(self.name, replay={"threshold": found["value"]} if found["applied"] else {}, record=found,
                      summary=summary)

    def replay_scores(self, replay, features, proba, threshold):
        return proba, replay.get("threshold", threshold)
