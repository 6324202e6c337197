"""Adapting a head to images that differ from the training ones, without their labels.

*Feature alignment* maps the training features (and validation, carved from the same images) towards the
target images' distribution, so that a head trained on them applies unchanged to the target images:

- ``standardize``: each dimension's mean and standard deviation made the target's (per-domain
  standardisation, expressed in the target's units);
- ``coral``: the covariance too (CORAL, Sun, Feng & Saenko 2016): source features whitened and re-coloured
  with the target's covariance, both regularised by the identity in source-standardised units, as in the paper.

*Prior shift*: the target's class balance estimated from a head's probabilities on the target images by EM
(Saerens, Latinne & Decaestecker 2002), and the probabilities re-weighted to it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import softmax

from featx.audit import ShiftTest, two_sample_test
from featx.errors import DataError

log = logging.getLogger(__name__)
MIN_TARGET_ROWS = 10  # fewer target images than this say too little about their distribution to align to


@dataclass(frozen=True)
class Alignment:
    """A fitted affine map of source-domain features into the target domain: ``x ↦ (x - shift) @ matrix + offset``
    (``matrix`` None: per dimension, ``(x - shift) * scale + offset``)."""

    method: str
    shift: np.ndarray
    offset: np.ndarray
    scale: np.ndarray | None = None
    matrix: np.ndarray | None = None

    def apply(self, X: np.ndarray) -> np.ndarray:
        if self.matrix is not None:
            return ((X - self.shift) @ self.matrix + self.offset).astype(np.float32)
        return ((X - self.shift) * self.scale + self.offset).astype(np.float32)


def fit_alignment(source: np.ndarray, target: np.ndarray, method: str, regularisation: float = 1.0) -> Alignment:
    """The ``standardize`` or ``coral`` map from ``source`` rows to ``target`` rows (no labels involved)."""
    if len(target) < MIN_TARGET_ROWS:
        raise DataError(f"aligning to the target images needs at least {MIN_TARGET_ROWS} of them; got {len(target)}")
    source, target = source.astype(np.float64), target.astype(np.float64)
    mean_s, mean_t = source.mean(0), target.mean(0)
    std_s = source.std(0) + 1e-6
    if method == "standardize":
        return Alignment(method, mean_s, mean_t, scale=(target.std(0) + 1e-6) / std_s)
    if method != "coral":
        raise DataError(f"unknown alignment {method!r}; choose standardize or coral")
    if len(target) < source.shape[1]:  # measured: chest X-rays 624 × 1280, AUC 0.962 → 0.929
        log.warning("CORAL estimates a %d × %d covariance from %d target images, fewer than its dimensions: "
                    "expect it to fit their noise; --align standardize needs only per-dimension moments",
                    source.shape[1], source.shape[1], len(target))
    # In source-standardised units, as CORAL's λ = 1 assumes; the map is then expressed on raw features.
    zs, zt = (source - mean_s) / std_s, (target - mean_t) / std_s
    eye = np.eye(source.shape[1])
    whiten = _matrix_power(np.cov(zs, rowvar=False) + regularisation * eye, -0.5)
    recolour = _matrix_power(np.cov(zt, rowvar=False) + regularisation * eye, 0.5)
    matrix = (whiten @ recolour) / std_s[:, None] * std_s[None, :]
    return Alignment(method, mean_s, mean_t, matrix=matrix)


def _matrix_power(symmetric: np.ndarray, power: float) -> np.ndarray:
    values, vectors = np.linalg.eigh(symmetric)
    return (vectors * np.clip(values, 1e-12, None) ** power) @ vectors.T


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

    def adjust(self, proba: np.ndarray) -> np.ndarray:
        """The head's ``proba`` re-weighted from the balance it implies to the target's."""
        return reweight(proba, self.source, self.target)

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


def prior_shift(p_val: np.ndarray, y_val: np.ndarray, p_target: np.ndarray, seed: int = 0,
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
