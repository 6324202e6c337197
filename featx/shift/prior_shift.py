"""``--prior-shift``: the test images' class balance estimated without their labels, and the probabilities
re-weighted to it where validation shows that helps.

The balance is estimated from a head's probabilities on the target images by EM (Saerens, Latinne &
Decaestecker 2002); predict replays the re-weighting with the two balances saved with the head.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import softmax

from featx.shift.audit import ShiftTest, two_sample_test
from featx.shift.remedy import Context, Fitted, Remedy, Scores


@dataclass(frozen=True)
class PriorShift:
    """The class balance a head implies on validation (``source``) and its EM estimate on the target images
    (``target``); ``applied`` when a simulated prior change on validation showed re-weighting helps.

    EM needs calibrated probabilities (regularised heads are under-confident, and EM then runs to a corner),
    so the estimate is made on probabilities calibrated on validation by bias-corrected temperature scaling
    (Alexandari, Kundaje & Shrikumar 2020): ``softmax(slope · log p + bias)``. The head's own probabilities
    are then re-weighted by ``target / source``: where the balance did not change, they stay as they were.
    """

    source: np.ndarray
    target: np.ndarray
    applied: bool
    validation: dict

    def summary(self, classes: list[str]) -> dict:
        return {"source": dict(zip(classes, np.round(self.source, 4).tolist())),
                "target": dict(zip(classes, np.round(self.target, 4).tolist())),
                "applied": self.applied, "validation": self.validation}


def em_priors(proba: np.ndarray, prior: np.ndarray, max_iter: int = 200, tol: float = 1e-6) -> np.ndarray:
    """Saerens et al.'s EM: the class balance of the rows behind ``proba`` (posteriors made under ``prior``)."""
    estimate = prior.copy()
    for _ in range(max_iter):
        updated = reweight(proba, prior, estimate).mean(0)
        if np.abs(updated - estimate).max() < tol:
            return updated
        estimate = updated
    return estimate


def reweight(proba: np.ndarray, prior: np.ndarray, new_prior: np.ndarray) -> np.ndarray:
    """Posteriors made under ``prior`` re-weighted to ``new_prior`` (Bayes' rule, renormalised per row)."""
    weighted = proba * (new_prior / np.clip(prior, 1e-12, None))
    return weighted / np.clip(weighted.sum(1, keepdims=True), 1e-300, None)


def estimate_prior_shift(p_val: np.ndarray, y_val: np.ndarray, p_target: np.ndarray, seed: int = 0,
                rounds: int = 20) -> PriorShift:
    """Estimate the target's class balance; decide on validation whether re-weighting to it helps.

    Re-weighting is kept only if the estimated change of balance (L1) exceeds what EM finds by chance on
    validation resamples of the target's size, and if, on validation rows resampled ``rounds`` times to the
    estimated balance, the same EM and re-weighting lower the log-loss without lowering the accuracy, on
    average. Test labels are never read.
    """
    k = p_val.shape[1]
    by_class = [np.flatnonzero(y_val == c) for c in range(k)]
    calibrated = _fit_calibration(p_val, y_val)
    source = calibrated(p_val).mean(0)
    target = em_priors(calibrated(p_target), source)
    if any(len(rows) == 0 for rows in by_class):
        return PriorShift(source, target, False, {"skipped": "a class is missing from val"})
    rng = np.random.default_rng(seed)
    # EM's estimate moves by chance too: its spread on validation resamples of the test's size at the unchanged
    # balance is the change a real shift has to exceed.
    change = float(np.abs(target - source).sum())
    by_chance = [np.abs(em_priors(calibrated(p_val[rng.integers(0, len(y_val), len(p_target))]), source)
                        - source).sum() for _ in range(rounds)]
    chance = float(np.quantile(by_chance, 0.95))
    deltas = []
    for _ in range(rounds):
        counts = rng.multinomial(len(y_val), target)
        rows = np.concatenate([rng.choice(by_class[c], counts[c]) for c in range(k)])
        p, y = p_val[rows], y_val[rows]
        adjusted = reweight(p, source, em_priors(calibrated(p), source))
        deltas.append((_log_loss(y, adjusted) - _log_loss(y, p),
                       (adjusted.argmax(1) == y).mean() - (p.argmax(1) == y).mean()))
    log_loss_change, accuracy_change = np.mean(deltas, axis=0)
    applied = bool(change > chance and log_loss_change < 0 and accuracy_change >= 0)
    return PriorShift(source, target, applied, {
        "rounds": rounds, "balance_change": round(change, 4), "by_chance_95": round(chance, 4),
        "log_loss_change": round(float(log_loss_change), 4), "accuracy_change": round(float(accuracy_change), 4)})


def unexplained_shift(X_train: np.ndarray, y_train: np.ndarray, X_target: np.ndarray, prior: np.ndarray,
                      seed: int = 0) -> ShiftTest:
    """Whether a change of class balance alone explains how the target images differ from the training ones.

    Training rows resampled to ``prior`` (the EM estimate) should be indistinguishable from the target rows if
    only the balance changed, which is what re-weighting assumes. A shift left over means the images themselves
    differ (another scanner), and EM's estimate is not to be trusted. Reads the training labels only.
    """
    rng = np.random.default_rng(seed)
    n = min(len(X_target), 2000)
    counts = rng.multinomial(n, prior)
    rows = np.concatenate([rng.choice(np.flatnonzero(y_train == k), counts[k])
                           for k in range(len(prior)) if counts[k] and (y_train == k).any()])
    return two_sample_test(X_train[rows], X_target, seed, permutations=99, permute_above=0.6)


def _fit_calibration(proba: np.ndarray, y: np.ndarray):
    """``p ↦ softmax(slope · log p + bias)`` with the slope and per-class bias that minimise the log-loss on
    (proba, y)."""
    def calibrate(p: np.ndarray, params: np.ndarray) -> np.ndarray:
        return softmax(np.exp(params[0]) * np.log(np.clip(p, 1e-12, None)) + np.r_[0.0, params[1:]], axis=1)

    found = minimize(lambda params: _log_loss(y, calibrate(proba, params)), np.zeros(proba.shape[1]),
                     method="L-BFGS-B").x
    return lambda p: calibrate(p, found)


def _log_loss(y: np.ndarray, proba: np.ndarray) -> float:
    return float(-np.log(np.clip(proba[np.arange(len(y)), y], 1e-15, None)).mean())


class PriorShiftRemedy(Remedy):
    """``estimate`` reports the test images' balance; ``auto`` also re-weights to it when a simulated change on
    validation showed that helps and the change of balance explains how the test images differ from the training
    ones (``unexplained_shift``). Never with a decision threshold, which was chosen for the validation balance."""

    name = parameter = "prior_shift"
    stage = "scores"

    def fit_scores(self, value, scores: Scores, context: Context) -> Fitted:
        found = estimate_prior_shift(scores.val, scores.val_labels, scores.test, context.seed)
        record = found.summary(context.classes)
        apply = value == "auto" and found.applied and scores.threshold is None
        if apply:
            train = context.splits.train
            left = unexplained_shift(train.features, train.labels, scores.test_features, found.target, context.seed)
            record["shift_after_reweighting_train"] = {"auc": round(left.auc, 4), "p_value": left.p_value}
            apply = not left.shifted
        record["applied"] = apply
        balance = ", ".join(f"{c} {p:.2f}" for c, p in record["target"].items())
        return Fitted(self.name, replay={"source": found.source.tolist(), "target": found.target.tolist()} if apply
                      else {}, record=record,
                      summary=f"test balance estimated at {balance}; probabilities "
                              f"{'re-weighted to it' if apply else 'left as they were'}")

    def replay_scores(self, replay, features, proba, threshold):
        if not replay:
            return proba, threshold
        return reweight(proba, np.asarray(replay["source"]), np.asarray(replay["target"])), threshold

    def reweighting(self, replay):
        if not replay:
            return None
        return np.asarray(replay["target"]) / np.clip(np.asarray(replay["source"]), 1e-12, None)
