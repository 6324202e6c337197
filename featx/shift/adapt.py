"""Adapting a head to images that differ from the training ones, without their labels.

*Feature alignment* maps the training features (and validation, carved from the same images) towards the
target images' distribution, so that a head trained on them applies unchanged to the target images:

- ``standardize``: each dimension's mean and standard deviation made the target's (per-domain
  standardisation, expressed in the target's units);
- ``coral``: the covariance too (CORAL, Sun, Feng & Saenko 2016): source features whitened and re-coloured
  with the target's covariance, both regularised by the identity in source-standardised units, as in the paper.

*Prior shift*: the target's class balance estimated from a head's probabilities on the target images by EM
(Saerens, Latinne & Decaestecker 2002), and the probabilities re-weighted to it.

*Transductive scoring* uses the target images themselves, never their labels: each image's probabilities
spread over its nearest neighbours among them (``smooth_over_neighbours``), and a binary decision threshold
where their own scores part into two groups (``mixture_threshold``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, logit, softmax
from sklearn.metrics import balanced_accuracy_score
from sklearn.mixture import GaussianMixture
from sklearn.neighbors import NearestNeighbors

from featx.shift.audit import ShiftTest, two_sample_test
from featx.errors import DataError

log = logging.getLogger(__name__)
MIN_TARGET_ROWS = 10  # fewer target images than this say too little about their distribution to align to
SPREAD_WEIGHT = 0.5  # the share of an image's smoothed scores that comes from its neighbours (label spreading's α)
SPREAD_ROUNDS = 10  # 0.5 ** 10 < 0.001: the spreading has converged
MIXTURE_TOLERANCE = 0.02  # validation balanced accuracy the mixture cut may lose against validation's own threshold


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


def smooth_over_neighbours(X: np.ndarray, proba: np.ndarray, k: int) -> np.ndarray:
    """Each row's class probabilities spread over its ``k`` nearest rows (cosine) among the same images.

    Label spreading (Zhou et al. 2004) with a head's log-probabilities as the seeds, renormalised: images that
    look alike get alike scores, which mends part of a head's errors on images unlike its training ones
    (chest X-rays from another hospital, k = 10: lite0 logreg test AUC 0.962 → 0.970). Spreading in log space
    keeps a confident neighbour from outvoting the rest as it would in probabilities (AUC 0.969 there).
    """
    k = min(k, len(X) - 1)
    if k < 1:
        return proba
    unit = X / np.clip(np.linalg.norm(X, axis=1, keepdims=True), 1e-12, None)
    found = NearestNeighbors(n_neighbors=k + 1).fit(unit).kneighbors(unit, return_distance=False)
    neighbours = np.array([[j for j in row if j != i][:k] for i, row in enumerate(found)])
    seeds = np.log(np.clip(proba, 1e-6, None))
    spread = seeds
    for _ in range(SPREAD_ROUNDS):
        spread = (1 - SPREAD_WEIGHT) * seeds + SPREAD_WEIGHT * spread[neighbours].mean(1)
    return softmax(spread, axis=1)


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
