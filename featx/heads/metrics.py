"""Every metric featx reports, bootstrap confidence intervals, and decision thresholds chosen on validation rows.

One set of definitions for the leaderboard, the fine-tuning history and the report. No torch here.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from sklearn import metrics as skm

from featx.errors import DataError
from featx.vocab import check

BOOTSTRAP_ROUNDS = 1000


def predict_labels(proba: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """Class index per row: argmax, or for two classes ``p(class 1) >= threshold`` when one was chosen."""
    if threshold is not None and proba.shape[1] == 2:
        return (proba[:, 1] >= threshold).astype(int)
    return proba.argmax(1)


def _auc(y: np.ndarray, proba: np.ndarray) -> float:
    if len(np.unique(y)) < 2:
        return float("nan")
    if proba.shape[1] == 2:
        return float(skm.roc_auc_score(y, proba[:, 1]))
    present = np.unique(y)
    if len(present) < proba.shape[1]:
        return float("nan")
    return float(skm.roc_auc_score(y, proba, multi_class="ovr", average="macro"))


def bootstrap_aucs(y: np.ndarray, proba: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``_auc(y[i], proba[i])`` for every resample ``i`` in ``index``, without sorting each one.

    A resample is the original rows with multiplicities, so each class's scores are sorted once and every
    resample's AUC is read from weighted counts of tied score groups (ties count a half, as in the
    Mann-Whitney statistic): 10,000 test rows × 1,000 resamples take a second instead of half a minute.
    Classes are summed in threads (numpy releases the GIL: 2× on 2 cores for 10 classes).
    NaN where a resample lacks a class, as ``_auc``.
    """
    n = len(y)
    positives = [1] if proba.shape[1] == 2 else range(proba.shape[1])
    out = np.empty(len(index))
    threads = min(len(positives), os.cpu_count() or 1)
    step = max(1, 20_000_000 // threads // max(n, 1))  # resamples at a time: bounded memory for large test sets
    with ThreadPoolExecutor(threads) as pool:
        for begin in range(0, len(index), step):
            chunk = index[begin:begin + step]
            offsets = (chunk + n * np.arange(len(chunk))[:, None]).ravel()
            # float32 counts are exact (a count is at most n) and halve the memory traffic of the sums below
            weights = np.bincount(offsets, minlength=len(chunk) * n).reshape(len(chunk), n).astype(np.float32)
            per_class = list(pool.map(lambda k: _weighted_auc(proba[:, k], y == k, weights), positives))
            out[begin:begin + step] = np.mean(per_class, axis=0)
    return out


def _weighted_auc(score: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    order = np.argsort(score, kind="stable")
    sorted_score = score[order]
    starts = np.flatnonzero(np.r_[True, sorted_score[1:] != sorted_score[:-1]])  # tied scores form one group
    w = weights[:, order]
    pos = np.add.reduceat(w * positive[order], starts, axis=1, dtype=np.float64)
    neg = np.add.reduceat(w, starts, axis=1, dtype=np.float64) - pos
    below = np.cumsum(neg, axis=1) - neg
    n_pos, n_neg = pos.sum(1), neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (pos * (below + 0.5 * neg)).sum(1) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def bootstrap_ci(y: np.ndarray, proba: np.ndarray, pred: np.ndarray, seed: int = 0) -> dict:
    """95 % percentile intervals of accuracy and ROC-AUC over resampled rows."""
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(y), size=(BOOTSTRAP_ROUNDS, len(y)))
    accuracy = (pred[index] == y[index]).mean(axis=1)
    aucs = bootstrap_aucs(y, proba, index)
    aucs = aucs[np.isfinite(aucs)]
    return {
        "accuracy_ci": [float(np.percentile(accuracy, 2.5)), float(np.percentile(accuracy, 97.5))],
        "roc_auc_ci": [float(np.percentile(aucs, 2.5)), float(np.percentile(aucs, 97.5))] if len(aucs) else None,
    }


def classification_metrics(y: np.ndarray, proba: np.ndarray, classes: list[str], *, threshold: float | None = None,
                           with_ci: bool = False, seed: int = 0) -> dict:
    """Accuracy, balanced accuracy, macro and per-class P/R/F1, ROC-AUC, log-loss, confusion matrices."""
    labels = np.arange(len(classes))
    pred = predict_labels(proba, threshold)
    precision, recall, f1, support = skm.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    confusion = skm.confusion_matrix(y, pred, labels=labels)
    with np.errstate(invalid="ignore", divide="ignore"):
        normalised = np.nan_to_num(confusion / confusion.sum(axis=1, keepdims=True))
    result = {
        "n": int(len(y)),
        "accuracy": float(skm.accuracy_score(y, pred)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y, pred)),
        "precision_macro": float(precision.mean()),
        "recall_macro": float(recall.mean()),
        "f1_macro": float(f1.mean()),
        "roc_auc": _auc(y, proba),
        "log_loss": float(skm.log_loss(y, proba, labels=labels)),
        "per_class": {c: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                      for c, p, r, f, s in zip(classes, precision, recall, f1, support)},
        "confusion": confusion.tolist(),
        "confusion_normalised": normalised.round(4).tolist(),
    }
    if with_ci:
        result.update(bootstrap_ci(y, proba, pred, seed))
    return result


def choose_threshold(y: np.ndarray, p_positive: np.ndarray, objective: str) -> float:
    """A decision threshold on validation rows: ``balanced_accuracy``, ``f1`` or ``sensitivity=0.95``.

    ``mixture`` gives validation the balanced-accuracy one; the test images' own threshold comes from their
    scores (``featx.shift.mixture_threshold.target_threshold``).
    """
    check("choose_threshold", threshold=objective)
    if objective == "mixture":
        objective = "balanced_accuracy"
    candidates = np.unique(np.r_[p_positive, 0.5])
    if objective.startswith("sensitivity="):
        target = float(objective.split("=", 1)[1])
        positives = np.sort(p_positive[y == 1])
        if not len(positives):
            raise DataError("cannot choose a sensitivity threshold: no positive rows in validation")
        # The largest threshold that still accepts the target share of positives.
        return float(positives[int(np.floor((1 - target) * len(positives)))])
    score = {"balanced_accuracy": skm.balanced_accuracy_score, "f1": skm.f1_score}[objective]
    scores = [score(y, (p_positive >= t).astype(int)) for t in candidates]
    return float(candidates[int(np.argmax(scores))])
