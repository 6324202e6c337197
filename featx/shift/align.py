"""``--align``: the training features mapped towards the test images' distribution, without their labels.

A head trained on the mapped features applies unchanged to the test images, so predict replays nothing:
new images are scored as the test images were.

- ``standardize``: each dimension's mean and standard deviation made the target's (per-domain
  standardisation, expressed in the target's units);
- ``coral``: the covariance too (CORAL, Sun, Feng & Saenko 2016): source features whitened and re-coloured
  with the target's covariance, both regularised by the identity in source-standardised units, as in the paper.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from featx.errors import DataError
from featx.shift.audit import two_sample_test
from featx.shift.remedy import MIN_TARGET_ROWS, Context, Fitted, Remedy

log = logging.getLogger(__name__)


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




class Align(Remedy):
    name = parameter = "align"

    def fit(self, value, context: Context) -> Fitted:
        splits = context.splits
        alignment = fit_alignment(splits.train.features, splits.test.features, value)
        after = two_sample_test(alignment.apply(splits.train.features), splits.test.features, context.seed,
                                permute_above=1.0)  # the AUC alone: how alike now
        return Fitted(self.name, record={"method": value, "shift_auc_after": round(after.auc, 4)}, state=alignment,
                      summary=f"training and validation features mapped to the test images by {value}; a classifier "
                              f"then tells them apart with AUC {after.auc:.4f}")

    def source(self, fitted: Fitted, X: np.ndarray) -> np.ndarray:
        return fitted.state.apply(X)
