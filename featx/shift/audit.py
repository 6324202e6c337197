"""Auditing an embedding file for what makes a leaderboard lie: shift between splits, and leaked duplicates.

Both come from the cached embeddings alone, in seconds, without torch.

*Shift* is a classifier two-sample test: if a logistic regression tells the images of one split from
another's better than chance (cross-validated ROC-AUC over balanced samples), they were not drawn alike,
and figures measured on one say little about the other. The p-value comes from refitting on permuted
split labels. Within each class where both splits have enough rows, so that a different class balance
alone does not count.

*Duplicates*: pairs of rows whose embeddings point the same way (cosine similarity at or above a
threshold) across two splits or within one: the same image re-encoded, resized or slightly cropped.

*Label issues*: confident learning (Northcutt, Jiang & Chuang 2021) on out-of-fold probabilities: a row whose
given class gets a low probability while another class is predicted above that class's own typical
confidence. *Outliers*: the rows least like every class (cosine to the nearest class centroid).
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.special import expit
from scipy.stats import rankdata
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from featx.errors import DataError
from featx.data.images import ImageError, open_rgb
from featx.store.memo import file_sha256
from featx.store.embeddings import Embeddings
from featx.store.neighbours import unit_rows

log = logging.getLogger(__name__)

SHIFT_AUC = 0.6  # above this, with p < SHIFT_P, the splits differ enough to distrust one's figures for the other
SHIFT_P = 0.01
PERMUTATIONS = 199  # the smallest p-value is then 0.005, below SHIFT_P
MIN_ROWS = 10  # per split (and per class within it) for a test to mean anything
MAX_ROWS = 2000  # per side: the AUC is as telling, and 199 permutations stay a matter of seconds
FOLDS = 5  # of the cross-validated AUC
FITS_AT_ONCE = 200  # logistic regressions fitted together by the permutation test
COMPONENTS = 32  # the test runs on the leading principal components: fast, and enough to see a shift
# Measured with efficientnet_lite0 on 20 flowers5 photos: their JPEG-q60, half-size and 5 %-cropped copies have
# cosine ≥ 0.898 with the original (median 0.94), distinct photos ≤ 0.81; of all 9.3 million flowers5 pairs,
# 851 (0.009 %) reach 0.88, an upper bound of the false-positive rate since that set holds real duplicates.
DUPLICATE_COSINE = 0.88
# Train rows up to which the report and the map look for label errors themselves (seconds); beyond, `featx audit`.
LABEL_CHECK_MAX_ROWS = 20_000
CONFIRM_PAIRS = 5000  # closest pairs checked by perceptual hash where the images are at hand (reading them costs)
# A 256-bit difference hash (16×16). Measured on 40 images of each shared set: JPEG-q60 and half-size copies differ
# from their original in at most 12 bits, 2 %-a-side crops in at most 34 (5 % crops: median 48-59). Of 19,900 random
# pairs, distinct photos (flowers5) differ in 127 bits (median; 99.9 % in 90 or more), distinct chest X-rays in 71
# (99.9 % in 27 or more): alike images are alike to any hash, so the confirming distance is calibrated on each
# dataset's own random pairs, robustly (median and MAD), so that a few real duplicates among them do not move it.
HASH_SIZE = 16
COPY_BITS = 64  # at most: copies of photos, including small crops, differ in fewer
CALIBRATION_IMAGES = 200  # hashed at random (19,900 pairs) to find how close distinct images of the dataset come
CALIBRATION_SIGMAS = 3.09  # below the median by this many robust standard deviations: the normal 0.1 % quantile


@dataclass
class ShiftTest:
    """How well two sets of rows can be told apart: AUC 0.5 is alike; the p-value is from permutations."""

    auc: float
    p_value: float | None  # None: not computed, the AUC being too low to matter (``permute_above``)
    n: int  # rows per side
    least_alike: list[int] = field(default_factory=list)  # rows of the second set most unlike the first

    @property
    def shifted(self) -> bool:
        return self.auc > SHIFT_AUC and self.p_value is not None and self.p_value <= SHIFT_P


def two_sample_test(a: np.ndarray, b: np.ndarray, seed: int = 0, permutations: int = PERMUTATIONS,
                    permute_above: float | None = None) -> ShiftTest:
    """Cross-validated AUC of telling ``a`` from ``b`` (equal-size seeded samples), with a permutation p-value;
    with ``permute_above``, the permutations run only for an AUC above it (a quick check for every compare)."""
    rng = np.random.default_rng(seed)
    n = min(len(a), len(b), MAX_ROWS)
    if n < MIN_ROWS:
        raise DataError(f"a shift test needs at least {MIN_ROWS} rows on each side; got {len(a)} and {len(b)}")
    pick_a, pick_b = rng.choice(len(a), n, replace=False), rng.choice(len(b), n, replace=False)
    X = np.concatenate([a[pick_a], b[pick_b]]).astype(np.float64)
    X = PCA(min(COMPONENTS, X.shape[1], 2 * n - 1), random_state=seed).fit_transform(X)  # unsupervised: no labels
    X = (X - X.mean(0)) / (X.std(0) + 1e-12)
    side = np.r_[np.zeros(n, int), np.ones(n, int)]
    fold = np.empty(2 * n, int)
    for k, (_, test) in enumerate(StratifiedKFold(FOLDS, shuffle=True, random_state=seed).split(X, side)):
        fold[test] = k
    scores = _out_of_fold(X, side[:, None], fold[:, None])[:, 0]
    observed = _auc(side[:, None], scores[:, None])[0]
    least_alike = pick_b[np.argsort(-scores[n:])[:10]].tolist()
    if permute_above is not None and observed <= permute_above:
        return ShiftTest(float(observed), None, n, least_alike)
    # each permutation moves rows with their fold, so every fold keeps its balance of the two sides
    shuffles = np.stack([rng.permutation(2 * n) for _ in range(permutations)], axis=1)
    permuted = side[shuffles]
    null = _auc(permuted, _out_of_fold(X, permuted, fold[shuffles]))
    p_value = (1 + (null >= observed).sum()) / (permutations + 1)
    return ShiftTest(float(observed), float(p_value), n, least_alike)


def _auc(sides: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ROC-AUC of each column (the Mann-Whitney statistic; ties count half), all columns at once."""
    ranks = rankdata(scores, axis=0)
    positives = sides.sum(0)
    negatives = len(sides) - positives
    return ((ranks * sides).sum(0) - positives * (positives + 1) / 2) / (positives * negatives)


def _out_of_fold(X: np.ndarray, sides: np.ndarray, fold: np.ndarray) -> np.ndarray:
    """Out-of-fold decision values of an L2 logistic regression (C = 0.1) telling ``sides`` apart, for each
    column of ``sides`` (rows × labellings, 0/1) with that column of ``fold`` (each row's fold number)."""
    rows, labellings = sides.shape
    if labellings * FOLDS > FITS_AT_ONCE:  # memory: a few arrays of rows × FITS_AT_ONCE
        parts = -(-labellings * FOLDS // FITS_AT_ONCE)
        return np.concatenate([_out_of_fold(X, s, f) for s, f in zip(np.array_split(sides, parts, axis=1),
                                                                      np.array_split(fold, parts, axis=1))], axis=1)
    X1 = np.c_[X, np.ones(rows)]  # the last weight is the intercept
    weights = _fit_logistic(X1, np.tile(sides, FOLDS), np.concatenate([fold != k for k in range(FOLDS)], axis=1))
    decision = (X1 @ weights).reshape(rows, FOLDS, labellings)
    return np.take_along_axis(decision, fold[:, None, :], axis=1)[:, 0, :]


def _fit_logistic(X: np.ndarray, y: np.ndarray, used: np.ndarray, C: float = 0.1) -> np.ndarray:
    """Weights of one L2 logistic regression per column of ``y``, fitted on that column's ``used`` rows, all at
    once by damped Newton steps; the last column of ``X`` is an unpenalised intercept. The minimum is
    scikit-learn's ``LogisticRegression(C=C)``'s; a permutation test needs a thousand such fits, and one at a
    time through scikit-learn took 3 ms each, most of it spent checking its arguments."""
    dim = X.shape[1]
    penalty = np.full(dim, 1 / C)
    penalty[-1] = 0.0
    outer = (X[:, :, None] * X[:, None, :]).reshape(len(X), dim * dim)

    def loss(w):
        z = X @ w
        return (used * (np.logaddexp(0, z) - y * z)).sum(0) + 0.5 * (penalty[:, None] * w * w).sum(0)

    w = np.zeros((dim, y.shape[1]))
    current = loss(w)
    for _ in range(100):
        p = expit(X @ w)
        gradient = X.T @ (used * (p - y)) + penalty[:, None] * w
        hessian = ((used * p * (1 - p)).T @ outer).reshape(-1, dim, dim) + np.diag(penalty)
        step = np.linalg.solve(hessian, gradient.T[:, :, None])[:, :, 0].T
        size = np.ones(y.shape[1])
        for _ in range(30):  # halve the step of every fit whose loss would rise
            trial = loss(w - size * step)
            worse = trial > current + 1e-12 * np.abs(current)
            if not worse.any():
                break
            size[worse] /= 2
        w -= size * step
        current = loss(w)
        if np.abs(size * step).max() < 1e-9:
            break
    return w


@dataclass
class ShiftReport:
    """The shift from one split to another: overall, and within each class both have enough rows of."""

    source: str
    target: str
    overall: ShiftTest
    per_class: dict[str, ShiftTest]
    least_alike_paths: list[str]

    @property
    def shifted(self) -> bool:
        return self.overall.shifted or any(t.shifted for t in self.per_class.values())

    def summary(self) -> dict:
        tests = {"overall": self.overall, **{f"class {k}": v for k, v in self.per_class.items()}}
        return {"from": self.source, "to": self.target, "shifted": self.shifted,
                "tests": {k: {"auc": round(t.auc, 4), "p_value": t.p_value, "rows": t.n} for k, t in tests.items()},
                "least_alike": self.least_alike_paths}


def shift_between(emb: Embeddings, source: str = "train", target: str = "test", seed: int = 0, *,
                  permutations: int = PERMUTATIONS, permute_above: float | None = None) -> ShiftReport:
    """``two_sample_test`` of the readable rows of ``source`` against ``target``, overall and per class."""
    a, b = emb.features(source), emb.features(target)
    labels_a, labels_b = emb.labels(source), emb.labels(target)
    overall = two_sample_test(a, b, seed, permutations, permute_above)
    per_class = {}
    for k, name in enumerate(emb.classes):
        in_a, in_b = labels_a == k, labels_b == k
        if in_a.sum() >= MIN_ROWS and in_b.sum() >= MIN_ROWS:
            per_class[name] = two_sample_test(a[in_a], b[in_b], seed, permutations, permute_above)
    paths = emb.paths_of(target)
    return ShiftReport(source, target, overall, per_class, [str(paths[i]) for i in overall.least_alike])


@dataclass(frozen=True)
class DuplicatePair:
    first: int  # rows of the file
    second: int
    cosine: float


def near_duplicates(emb: Embeddings, threshold: float = DUPLICATE_COSINE, block: int = 2048) -> list[DuplicatePair]:
    """Every pair of readable rows (augmented copies left out) whose embeddings' cosine is ≥ ``threshold``.

    Blocks of rows against all later rows: memory stays at ``block`` × rows, whatever the file's size.
    """
    rows, X = emb.rows(), emb.features()  # features() holds the rows of rows(), in order
    X = unit_rows(X)
    pairs = []
    for begin in range(0, len(X), block):
        similarity = X[begin:begin + block] @ X[begin:].T
        for i, j in zip(*np.nonzero(similarity >= threshold)):
            if begin + i < begin + j:  # each pair once, never a row with itself
                pairs.append(DuplicatePair(int(rows[begin + i]), int(rows[begin + j]), float(similarity[i, j])))
    return pairs


def has_near_duplicate(X: np.ndarray, reference: np.ndarray, threshold: float = DUPLICATE_COSINE,
                       block: int = 512) -> np.ndarray:
    """For each row of ``X``, whether some row of ``reference`` has cosine ≥ ``threshold`` with it (blockwise)."""
    reference = unit_rows(reference)
    found = np.zeros(len(X), bool)
    for begin in range(0, len(X), block):
        part = X[begin:begin + block]
        part = unit_rows(part)
        found[begin:begin + block] = (part @ reference.T).max(axis=1, initial=-1.0) >= threshold
    return found


def exact_duplicates(emb: Embeddings, root: Path) -> list[list[int]]:
    """Groups of rows whose image files under ``root`` have the same bytes (SHA-256), each group in row order."""
    by_hash: dict[str, list[int]] = {}
    for row in emb.rows():
        path = root / emb.paths[row]
        if path.is_file():
            by_hash.setdefault(file_sha256(path), []).append(int(row))
    return [rows for rows in by_hash.values() if len(rows) > 1]


def difference_hash(path: Path, size: int = HASH_SIZE) -> int | None:
    """A perceptual hash of size² bits: which of neighbouring pixels is brighter, on a (size+1)×size grey thumbnail.
    Re-encoding, resizing and small crops change few bits; distinct photos differ in about half. None: unreadable."""
    try:
        grey = np.asarray(open_rgb(path, min_side=4 * size).convert("L").resize((size + 1, size)), dtype=np.int16)
    except (ImageError, OSError):
        return None
    return int.from_bytes(np.packbits(grey[:, 1:] > grey[:, :-1]).tobytes(), "big")


def _bits(first: int, second: int) -> int:
    return bin(first ^ second).count("1")


@dataclass(frozen=True)
class HashCheck:
    """Perceptual-hash distances of the closest pairs, and the distance within which a pair counts as one image."""

    distances: dict[tuple[int, int], int]  # (row, row) → bits that differ
    same_image_bits: int  # a pair within this many bits is confirmed
    random_pairs: int  # pairs of the file's images, drawn at random, that calibrated it
    false_positive_rate: float | None  # share of those random pairs within same_image_bits

    def confirms(self, pair: DuplicatePair) -> bool:
        distance = self.distances.get((pair.first, pair.second))
        return distance is not None and distance <= self.same_image_bits

    @property
    def confirmed(self) -> int:
        return sum(d <= self.same_image_bits for d in self.distances.values())


def calibrate_hash(hashes: list[int]) -> tuple[int, int, float | None]:
    """(same_image_bits, random pairs, false-positive rate) from the hashes of images drawn at random: the median
    distance of their pairs less ``CALIBRATION_SIGMAS`` robust standard deviations (1.4826 MAD), at most
    ``COPY_BITS``. The rate is the share of those pairs within it, real duplicates among them included."""
    distances = np.array([_bits(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1:]])
    if not len(distances):  # fewer than two readable images: nothing to calibrate on
        return COPY_BITS, 0, None
    median = np.median(distances)
    spread = 1.4826 * np.median(np.abs(distances - median))
    bits = max(0, int(min(COPY_BITS, np.floor(median - CALIBRATION_SIGMAS * spread))))
    return bits, len(distances), float((distances <= bits).mean())


def confirm_pairs(emb: Embeddings, pairs: list[DuplicatePair], root: Path, seed: int = 0,
                  limit: int = CONFIRM_PAIRS) -> HashCheck:
    """Perceptual-hash distances of the closest ``limit`` pairs whose images are under ``root``, and the distance
    that confirms a near-duplicate, calibrated on ``CALIBRATION_IMAGES`` of the file's images drawn at random."""
    hashes: dict[int, int | None] = {}

    def hash_of(row: int) -> int | None:
        if row not in hashes:
            hashes[row] = difference_hash(root / emb.paths[row])
        return hashes[row]

    rows = emb.rows()
    drawn = np.random.default_rng(seed).choice(rows, min(CALIBRATION_IMAGES, len(rows)), replace=False)
    sample = [h for h in map(hash_of, drawn) if h is not None]
    same_image_bits, random_pairs, false_positive_rate = calibrate_hash(sample)
    distances = {}
    for pair in sorted(pairs, key=lambda p: -p.cosine)[:limit]:
        first, second = hash_of(pair.first), hash_of(pair.second)
        if first is not None and second is not None:
            distances[(pair.first, pair.second)] = _bits(first, second)
    return HashCheck(distances, same_image_bits, random_pairs, false_positive_rate)


def leaked_rows(emb: Embeddings, pairs: list[DuplicatePair], into: str = "test", from_: str = "train") -> set[int]:
    """Rows of ``into`` with a near-duplicate in ``from_``: its figures on them are memory, not generalisation."""
    leaked = set()
    for pair in pairs:
        splits = emb.splits[pair.first], emb.splits[pair.second]
        if splits == (from_, into):
            leaked.add(pair.second)
        elif splits == (into, from_):
            leaked.add(pair.first)
    return leaked


@dataclass(frozen=True)
class LabelIssue:
    row: int  # of the file
    given: int  # class index
    suggested: int
    p_given: float  # out-of-fold probability of the given class
    p_suggested: float


def label_issues(emb: Embeddings, split: str = "train", seed: int = 0, folds: int = 5) -> list[LabelIssue]:
    """Rows of ``split`` whose label is likely wrong, the least self-confident first.

    Out-of-fold probabilities of a logistic regression on the leading principal components; a class's
    threshold is its mean probability over the rows labelled with it. A row is in question when some other
    class reaches its own threshold and beats the given class (confident learning's off-diagonal rows).
    """
    rows, X, y = emb.rows(split), emb.features(split), emb.labels(split)
    labelled = y >= 0
    rows, X, y = rows[labelled], X[labelled], y[labelled]
    present = np.unique(y)
    counts = np.bincount(y)
    if len(present) < 2 or counts[present].min() < folds:
        raise DataError(f"{emb.path}: finding label issues needs at least {folds} {split} rows in each of two "
                        "classes or more")
    model = make_pipeline(StandardScaler(), PCA(min(64, X.shape[1], len(y) - len(y) // folds - 1),
                                                random_state=seed),
                          StandardScaler(), LogisticRegression(C=0.1, max_iter=1000))
    proba = np.zeros((len(y), len(emb.classes)))
    proba[:, present] = cross_val_predict(model, X, y, method="predict_proba",
                                          cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    thresholds = np.array([proba[y == k, k].mean() if (y == k).any() else np.inf for k in range(proba.shape[1])])
    confident = np.where(proba >= thresholds, proba, -1.0)
    confident[np.arange(len(y)), y] = -1.0  # only another class can put the label in question
    suggested = confident.argmax(1)
    p_given, p_other = proba[np.arange(len(y)), y], proba[np.arange(len(y)), suggested]
    flagged = np.flatnonzero((confident.max(1) >= 0) & (p_other > p_given))
    return [LabelIssue(int(rows[i]), int(y[i]), int(suggested[i]), float(p_given[i]), float(p_other[i]))
            for i in flagged[np.argsort(p_given[flagged], kind="stable")]]


def checked_labels(emb: Embeddings, seed: int = 0) -> tuple[list[LabelIssue], str]:
    """``label_issues`` of train where a quick look can afford them; else none, and why not."""
    if "train" not in emb.split_names:
        return [], "no train split: no label check"
    if len(emb.rows("train")) > LABEL_CHECK_MAX_ROWS:
        return [], f"more than {LABEL_CHECK_MAX_ROWS} training rows: run `featx audit {emb.path}` for the list"
    try:
        return label_issues(emb, "train", seed=seed), ""
    except DataError as err:
        return [], str(err)


def outliers(emb: Embeddings, split: str = "train", count: int = 20) -> list[tuple[int, float]]:
    """The ``count`` rows of ``split`` least like every class: (row, 1 − cosine to the nearest class centroid)."""
    rows, X, y = emb.rows(split), emb.features(split), emb.labels(split)
    unit = unit_rows(X)
    centroids = np.stack([unit[y == k].mean(0) for k in np.unique(y[y >= 0])])
    centroids = unit_rows(centroids)
    distance = 1.0 - (unit @ centroids.T).max(1)
    worst = np.argsort(-distance, kind="stable")[:count]
    return [(int(rows[i]), float(distance[i])) for i in worst]


@dataclass
class Audit:
    """What ``featx audit`` found in one file: the shift report, every near-duplicate pair, the leaked rows."""

    embeddings: Embeddings
    shift: ShiftReport
    pairs: list[DuplicatePair]
    leaked: set[int]
    duplicate_cosine: float
    issues: list[LabelIssue]
    far: list[tuple[int, float]]  # outliers: (row, distance)
    exact: list[list[int]] = field(default_factory=list)  # rows with identical files; empty without the images
    hashes: HashCheck | None = None  # the perceptual-hash check of the closest pairs, where the images are at hand

    @property
    def threshold_too_low(self) -> float | None:
        """A higher cosine to try when more pairs than images were found: in a domain whose images are all alike
        (chest X-rays) the threshold measured on photos flags ordinary pairs. The suggestion keeps the closest
        pairs, one for every hundred images."""
        rows = len(self.embeddings.rows())
        if len(self.pairs) <= rows:
            return None
        closest = sorted((p.cosine for p in self.pairs), reverse=True)
        return round(closest[max(1, rows // 100) - 1], 3)

    @property
    def leaked_and_confirmed(self) -> set[int] | None:
        """The leaked rows whose pair the perceptual hash confirms too; None without the images."""
        if self.hashes is None:
            return None
        return leaked_rows(self.embeddings, [p for p in self.pairs if self.hashes.confirms(p)],
                           into=self.shift.target, from_=self.shift.source)

    def summary(self) -> dict:
        """The findings as plain data (``audit.json``)."""
        shift = self.shift
        return {
            "shift": shift.summary(),
            "duplicates": {"cosine": self.duplicate_cosine, "pairs": len(self.pairs),
                           f"leaked_into_{shift.target}": len(self.leaked),
                           "suggested_cosine": self.threshold_too_low,
                           "perceptual_hash": None if self.hashes is None else {
                               "checked": len(self.hashes.distances), "confirmed": self.hashes.confirmed,
                               f"leaked_into_{shift.target}": len(self.leaked_and_confirmed),
                               "same_image_bits": self.hashes.same_image_bits, "of_bits": HASH_SIZE ** 2,
                               "random_pairs": self.hashes.random_pairs,
                               "false_positive_rate": self.hashes.false_positive_rate},
                           "identical_files": {"groups": len(self.exact), "rows": sum(map(len, self.exact)),
                                               "across_splits": sum(len({self.embeddings.splits[r] for r in g}) > 1
                                                                    for g in self.exact)}},
            "label_issues": {"split": shift.source, "rows": len(self.issues)},
            "outliers": [{"path": str(self.embeddings.paths[row]), "distance": round(d, 4)} for row, d in self.far],
        }

    def save(self, out: Path) -> None:
        """``out/duplicates.csv`` (every pair), ``out/label_issues.csv`` and ``out/audit.json`` (the summary)."""
        emb = self.embeddings
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "duplicates.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path_a", "split_a", "path_b", "split_b", "cosine", "hash_bits"])
            distances = self.hashes.distances if self.hashes else {}
            writer.writerows([emb.paths[p.first], emb.splits[p.first], emb.paths[p.second], emb.splits[p.second],
                              f"{p.cosine:.4f}", distances.get((p.first, p.second), "")] for p in self.pairs)
        classes = emb.classes
        with open(out / "label_issues.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "given", "suggested", "p_given", "p_suggested"])
            writer.writerows([emb.paths[i.row], classes[i.given], classes[i.suggested], f"{i.p_given:.4f}",
                              f"{i.p_suggested:.4f}"] for i in self.issues)
        (out / "audit.json").write_text(json.dumps(self.summary(), indent=2) + "\n")


def audit(emb: Embeddings, source: str = "train", target: str = "test", *,
          duplicate_cosine: float = DUPLICATE_COSINE, seed: int = 0, images: bool = True) -> Audit:
    """Shift from ``source`` to ``target``, near-duplicates (with the ``target`` rows leaked from ``source``), and
    the label issues and outliers of ``source``. With ``images`` and the dataset at hand, also identical files
    and the perceptual-hash check of the closest pairs."""
    pairs = near_duplicates(emb, duplicate_cosine)
    found = Audit(emb, shift_between(emb, source, target, seed), pairs,
                  leaked_rows(emb, pairs, into=target, from_=source), duplicate_cosine,
                  label_issues(emb, source, seed), outliers(emb, source))
    root = Path(emb.meta.get("dataset_root") or "")
    if images and emb.meta.get("dataset_root") and root.is_dir():
        found.exact = exact_duplicates(emb, root)
        found.hashes = confirm_pairs(emb, pairs, root, seed)
    return found
