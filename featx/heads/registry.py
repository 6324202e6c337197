"""The head registry: classifiers trained on cached embeddings, each a scikit-learn Pipeline and a small search space.

Heads never import torch: this is the loop analysts iterate in, and it must start and run
in seconds on a laptop CPU. Hyper-parameters are chosen on the validation split (or by
stratified K-fold CV on train when asked); the test split is never seen here.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.metrics import get_scorer
from sklearn.model_selection import GridSearchCV, ParameterGrid, StratifiedKFold, StratifiedShuffleSplit, train_test_split
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import SVC
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from featx.heads import serialize
from featx.errors import ConfigError, DataError, UnsafeFileWarning, name_taken, unknown_name
from featx.version import __version__

log = logging.getLogger(__name__)

HEAD_FORMAT = "featx.head/2"  # a JSON document (the pipeline as plain data) beside an .npz of its arrays
JOBLIB_HEAD_FORMAT = "featx.head/1"  # a joblib pickle of everything: loaded only with trust
# Beyond this many training rows an RBF SVM's cost (about N² kernel evaluations) outgrows the budget.
RBF_MAX_ROWS = 10_000
# From this many training rows, heads that ask for it are tuned by successive halving (see _halving_search),
# and LightGBM samples rows by gradient (GOSS) instead of bagging.
HALVING_MIN_ROWS = 20_000
HALVING_FACTOR = 3
# The first halving round compares candidates on at most this many rows. (Measured on the 60,000-row stand-in:
# num_leaves 7/15/31 rank the same on 6,700 rows as on 17,000, for a third of the time.)
HALVING_FIRST_ROWS = HALVING_MIN_ROWS // HALVING_FACTOR


@dataclass(frozen=True)
class HeadPlan:
    """A pipeline to tune, its search space, and why it was built this way (recorded with the run)."""

    pipeline: Pipeline
    grid: dict
    note: str
    warm_start: str | None = None  # a grid parameter whose values are fitted in order, each from the last solution
    halving: bool = False  # with enough rows, candidates are first compared on a fraction of them


@dataclass(frozen=True)
class HeadSpec:
    name: str
    description: str
    plan: Callable[[int, int, int], HeadPlan]  # (n_rows, n_features, seed) -> HeadPlan


HEADS: dict[str, HeadSpec] = {}


def register_head(name: str, description: str, replace: bool = False):
    """Decorator registering a plan function under ``name``; a name already there is refused unless ``replace``."""
    def register(plan):
        if name in HEADS and not replace:
            raise name_taken("head", name)
        HEADS[name] = HeadSpec(name, description, plan)
        return plan
    return register


def list_heads() -> list[str]:
    return list(HEADS)


def get_head(name: str) -> HeadSpec:
    try:
        return HEADS[name]
    except KeyError:
        raise unknown_name("head", name, HEADS) from None


def resolve_heads(names: str | list[str]) -> list[str]:
    """``"all"``, ``"logreg,svm"`` or a list, checked against the registry."""
    items = names.split(",") if isinstance(names, str) else list(names)
    items = [n.strip() for n in items if n.strip()]
    if not items:
        raise ConfigError(f"no heads given; choose from {', '.join(HEADS)} (comma-separated) or all")
    if items == ["all"]:
        return list_heads()
    return [get_head(n).name for n in items]


def _pca(n_features: int, n_rows: int, components: int, seed: int) -> PCA:
    return PCA(n_components=min(components, n_features, max(2, n_rows - 1)), random_state=seed)


@register_head("logreg", "multinomial logistic regression, balanced class weights")
def _logreg(n_rows: int, n_features: int, seed: int) -> HeadPlan:
    pipeline = Pipeline([("scale", StandardScaler()),
                         ("clf", LogisticRegression(max_iter=3000, class_weight="balanced"))])
    return HeadPlan(pipeline, {"clf__C": [0.003, 0.01, 0.1, 1.0]},
                    "lbfgs multinomial, balanced class weights; C tuned along a warm-started path",
                    warm_start="clf__C")


@register_head("svm", "SVM (RBF on PCA-256 for small N, linear beyond), explicitly calibrated")
def _svm(n_rows: int, n_features: int, seed: int) -> HeadPlan:
    pca = _pca(n_features, n_rows, 256, seed)
    if n_rows <= RBF_MAX_ROWS:
        # Platt scaling on 3 internal folds gives probabilities on purpose, not SVC(probability=True) by default.
        svm = CalibratedClassifierCV(SVC(kernel="rbf", class_weight="balanced"), method="sigmoid", cv=3)
        pipeline = Pipeline([("scale", StandardScaler()), ("pca", pca), ("clf", svm)])
        return HeadPlan(pipeline, {"clf__estimator__C": [0.1, 1.0, 10.0]},
                        f"RBF kernel (N={n_rows} <= {RBF_MAX_ROWS}) on {pca.n_components} PCA components, "
                        "sigmoid-calibrated (3 folds)")
    # Beyond, a linear SVM: the hinge loss by SGD (the classes one against the rest on every core) fits 60,000
    # rows in seconds where liblinear took 25 s per fit, as accurately; calibrated on one held-out tenth.
    svm = HingeSGD(seed=seed)
    held_out = StratifiedShuffleSplit(n_splits=1, test_size=0.1, random_state=seed)
    pipeline = Pipeline([("scale", StandardScaler()), ("pca", pca),
                         ("clf", CalibratedClassifierCV(svm, method="sigmoid", cv=held_out))])
    return HeadPlan(pipeline, {"clf__estimator__alpha": [1e-5, 1e-4, 1e-3]},
                    f"linear kernel (N={n_rows} > {RBF_MAX_ROWS}: RBF cost grows as N²), hinge loss by SGD on "
                    f"{pca.n_components} PCA components, sigmoid-calibrated on a held-out tenth")


@register_head("lightgbm", "LightGBM on PCA-64 features, early stopping on an inner validation fold")
def _lightgbm(n_rows: int, n_features: int, seed: int) -> HeadPlan:
    large = n_rows >= HALVING_MIN_ROWS
    lightgbm = EarlyStoppedLightGBM(sampling="goss" if large else "bagging", seed=seed)
    pipeline = Pipeline([("pca", _pca(n_features, n_rows, 64, seed)), ("clf", lightgbm)])
    return HeadPlan(pipeline, {"clf__num_leaves": [7, 15, 31]},
                    f"gradient boosting on {pipeline['pca'].n_components} PCA components (trees on 1280 dense "
                    "dims are slow and no more accurate), early stopping on a 10 % inner fold"
                    + ("; rows sampled by gradient (GOSS), num_leaves by successive halving" if large else ""),
                    halving=large)


@register_head("knn", "k nearest neighbours, cosine distance")
def _knn(n_rows: int, n_features: int, seed: int) -> HeadPlan:
    pipeline = Pipeline([("norm", Normalizer()),
                         ("clf", KNeighborsClassifier(metric="cosine", algorithm="brute", weights="distance"))])
    ks = sorted({k for k in (5, 15, 31) if k < n_rows} or {1})
    return HeadPlan(pipeline, {"clf__n_neighbors": ks}, "cosine distance, distance-weighted votes")


@register_head("mlp", "dense head: one hidden layer of 128 units, L2 and early stopping")
def _mlp(n_rows: int, n_features: int, seed: int) -> HeadPlan:
    pipeline = Pipeline([("scale", StandardScaler()),
                         ("clf", MLPClassifier(hidden_layer_sizes=(128,), early_stopping=n_rows >= 50,
                                               max_iter=300, random_state=seed))])
    return HeadPlan(pipeline, {"clf__alpha": [1e-3, 1e-1, 1.0]},
                    "scikit-learn MLP, 128 ReLU units; L2 (alpha) in place of dropout, early stopping on 10 %")


class HingeSGD(ClassifierMixin, BaseEstimator):
    """A linear SVM (hinge loss, L2 penalty ``alpha``) fitted by SGD with early stopping, one class against the
    rest on every core; only the fitted planes are kept, so it saves as plain data."""

    def __init__(self, alpha: float = 1e-4, class_weight: str | None = "balanced", seed: int = 0):
        self.alpha = alpha
        self.class_weight = class_weight
        self.seed = seed

    def fit(self, X, y):
        X, y = validate_data(self, X, y)
        sgd = SGDClassifier(loss="hinge", alpha=self.alpha, class_weight=self.class_weight, early_stopping=True,
                            n_jobs=os.cpu_count(), random_state=self.seed).fit(X, y)
        # C order, as a saved head reads it back: the same layout gives the same sums to the last bit.
        self.coef_, self.intercept_ = np.ascontiguousarray(sgd.coef_), sgd.intercept_
        self.classes_, self.n_iter_ = sgd.classes_, sgd.n_iter_
        return self

    def decision_function(self, X):
        check_is_fitted(self)
        scores = validate_data(self, X, reset=False) @ self.coef_.T + self.intercept_
        return scores.ravel() if scores.shape[1] == 1 else scores

    def predict(self, X):
        scores = self.decision_function(X)
        return self.classes_[(scores > 0).astype(int) if scores.ndim == 1 else scores.argmax(1)]


def import_lightgbm():
    """LightGBM, its OpenMP threads waiting passively (``OMP_WAIT_POLICY=PASSIVE``) unless the user chose a policy.

    Spinning threads made a fit 2.8× slower while another process used one of two cores, passive ones 1.3×, for
    6 % more time alone (AMD EPYC, 2 threads, 54,000 × 64: scripts/bench_heads.py --lightgbm-threads). Fewer threads
    when the machine is busy would do better still, but LightGBM's trees change with the thread count, and the
    leaderboard must not change with the machine's load. OpenMP reads the policy when LightGBM loads it: set
    around the first import only.
    """
    if "lightgbm" in sys.modules:
        return sys.modules["lightgbm"]
    chosen = os.environ.get("OMP_WAIT_POLICY")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import lightgbm
    finally:
        if chosen is None:
            os.environ.pop("OMP_WAIT_POLICY", None)
    return lightgbm


LIGHTGBM_MIN_LEAF = 20  # LightGBM's min_child_samples default: fewer rows in a leaf are never split off

SAMPLING = {"bagging": {"subsample": 0.8, "subsample_freq": 1}, "goss": {"data_sample_strategy": "goss"}}


class EarlyStoppedLightGBM(ClassifierMixin, BaseEstimator):
    """LightGBM that stops adding trees when a stratified inner validation fold stops improving.

    ``sampling``: each tree sees a random 80 % of the rows (``bagging``), or the rows with the largest gradients
    and a sample of the rest (``goss``, LightGBM's gradient-based one-side sampling; measured on 51,000 × 64:
    1.7× faster than bagging for the same validation accuracy).
    """

    def __init__(self, num_leaves: int = 15, learning_rate: float = 0.05, max_trees: int = 1000,
                 patience: int = 30, class_weight: str | None = "balanced", sampling: str = "bagging", seed: int = 0):
        self.num_leaves = num_leaves
        self.sampling = sampling
        self.class_weight = class_weight
        self.learning_rate = learning_rate
        self.max_trees = max_trees
        self.patience = patience
        self.seed = seed

    def fit(self, X, y):
        lightgbm = import_lightgbm()
        X, y = validate_data(self, X, y)
        check_classification_targets(y)
        if self.sampling not in SAMPLING:
            raise ConfigError(f"unknown LightGBM sampling {self.sampling!r}; choose from {', '.join(SAMPLING)}")
        self.classes_, y_index = np.unique(y, return_inverse=True)
        # Too few rows for an inner fold: a short fixed number of trees instead of early stopping.
        stop_early = len(y) >= 50 and np.bincount(y_index).min() >= 5
        if len(y) < 2 * LIGHTGBM_MIN_LEAF:
            log.warning("lightgbm: %d training rows cannot be split into two leaves of %d (LightGBM's "
                        "min_child_samples): every tree is one leaf, and it predicts the training balance for every "
                        "image", len(y), LIGHTGBM_MIN_LEAF)
        self.model_ = lightgbm.LGBMClassifier(
            n_estimators=self.max_trees if stop_early else min(self.max_trees, 100),
            learning_rate=self.learning_rate, num_leaves=self.num_leaves, class_weight=self.class_weight,
            **SAMPLING[self.sampling], colsample_bytree=0.8, random_state=self.seed, verbose=-1,
            # Threads only pay off on large inputs; on small ones OpenMP start-up and spinning dominate. (Measured:
            # 17,000 × 64 fits 1.8× faster on 2 threads.)
            n_jobs=min(2, os.cpu_count() or 1) if len(X) * X.shape[1] > 500_000 else 1,
        )
        if stop_early:
            X_fit, X_stop, y_fit, y_stop = train_test_split(X, y_index, test_size=0.1, random_state=self.seed,
                                                            stratify=y_index)
            self.model_.fit(X_fit, y_fit, eval_X=(X_stop,), eval_y=(y_stop,),
                            callbacks=[lightgbm.early_stopping(self.patience, verbose=False)])
        else:
            self.model_.fit(X, y_index)
        self.best_iteration_ = self.model_.best_iteration_ or self.model_.n_estimators
        return self

    def predict_proba(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, reset=False)
        if len(self.classes_) == 1:
            return np.ones((len(X), 1))
        return self.model_.predict_proba(X)

    def predict(self, X):
        proba = self.predict_proba(X)
        return self.classes_[proba.argmax(1)]


def average_in_logit_space(probas: list[np.ndarray]) -> np.ndarray:
    """Heads' class probabilities averaged as log-probabilities and renormalised (for two classes: the mean of
    their logits; a normalised geometric mean): a head that is sure counts for more than in a plain mean."""
    logs = np.mean([np.log(np.clip(p, 1e-7, None)) for p in probas], axis=0)
    logs -= logs.max(axis=1, keepdims=True)
    return np.exp(logs) / np.exp(logs).sum(axis=1, keepdims=True)


class AveragedHeads(ClassifierMixin, BaseEstimator):
    """Several fitted heads, each on its own block of columns (one backbone's features in several backbones'
    side by side), averaged in logit space. Made by ``compare --ensemble`` from heads it has already fitted."""

    def __init__(self, members: list | None = None, blocks: list[tuple[int, int]] | None = None):
        self.members = members
        self.blocks = blocks

    def predict_proba(self, X):
        X = np.asarray(X)
        if X.shape[1] != self.blocks[-1][1]:
            raise DataError(f"these features have {X.shape[1]} columns; the averaged heads expect "
                            f"{self.blocks[-1][1]} (their backbones' features side by side)")
        return average_in_logit_space([m.predict_proba(X[:, start:stop])
                                       for m, (start, stop) in zip(self.members, self.blocks)])

    @property
    def classes_(self):
        return self.members[0].classes_

    def predict(self, X):
        return self.classes_[self.predict_proba(X).argmax(1)]


@dataclass
class FittedHead:
    """A tuned and fitted head with what is needed to trust it later."""

    name: str
    pipeline: Pipeline
    best_params: dict
    tuning_score: float
    tuned_on: str
    note: str
    fit_seconds: float
    extra: dict = field(default_factory=dict)


def fit_head(name: str, X_train, y_train, X_val=None, y_val=None, *, cv: int | None = None, seed: int = 0,
             scoring: str = "balanced_accuracy", params: dict | None = None) -> FittedHead:
    """Tune ``name`` on the validation rows (the best candidate, fitted on train, is kept) or by K-fold CV on
    train (the best is then refit on all of train).

    ``params`` fixes pipeline parameters (``{"clf__C": 1.0}``, ``{"clf__class_weight": None}``); a fixed
    parameter leaves the search space.
    """
    spec = get_head(name)
    plan = spec.plan(len(X_train), X_train.shape[1], seed)
    if params:
        try:
            plan.pipeline.set_params(**params)
        except ValueError as err:
            raise ConfigError(f"head {name!r}: {err}") from None
        grid = {k: v for k, v in plan.grid.items() if k not in params}  # may be empty: one candidate
        plan = replace(plan, grid=grid, note=f"{plan.note}; fixed {params}",
                       warm_start=plan.warm_start if plan.warm_start in grid else None)
    began = time.perf_counter()
    with warnings.catch_warnings():
        # Early-stopped or capped solvers warn on every grid point; the scores already say how they did.
        warnings.simplefilter("ignore", ConvergenceWarning)
        if cv is not None or X_val is None:
            best, params, score, tuned_on = _cv_search(plan, X_train, y_train, cv, seed, scoring)
        else:
            best, params, score = _validation_search(plan, X_train, y_train, X_val, y_val, seed, scoring)
            tuned_on = "validation split"
    return FittedHead(name=name, pipeline=best, best_params=params, tuning_score=score, tuned_on=tuned_on,
                      note=plan.note, fit_seconds=time.perf_counter() - began)


def _cv_search(plan: HeadPlan, X, y, cv: int | None, seed: int, scoring: str):
    """K-fold CV on train, then the best refit on all of train."""
    smallest = int(np.bincount(np.unique(y, return_inverse=True)[1]).min())
    folds = min(cv or 5, smallest)
    if folds < 2:
        raise DataError(f"cannot tune by cross-validation: the smallest class has {smallest} training row; "
                        "at least 2 are needed")
    if cv and folds < cv:
        log.warning("%d-fold CV asked for, but the smallest class has %d training rows: tuning with %d folds",
                    cv, smallest, folds)
    search = GridSearchCV(plan.pipeline, plan.grid, scoring=scoring, cv=StratifiedKFold(folds, shuffle=True,
                                                                                         random_state=seed),
                          refit=False, n_jobs=1).fit(X, y)
    best = plan.pipeline.set_params(**search.best_params_).fit(X, y)
    return best, search.best_params_, float(search.best_score_), f"{folds}-fold stratified CV on train"


def _validation_search(plan: HeadPlan, X, y, X_val, y_val, seed: int, scoring: str):
    """Each candidate fitted on train and scored on validation; the best one fitted is kept (no refit).

    When only the last step is tuned, the steps before it (scaling, PCA) are fitted once for all candidates.
    A ``warm_start`` parameter's values are fitted in order, each from the last solution (a regularisation
    path); a ``halving`` plan with enough rows first narrows the candidates on fractions of the rows. Ties go
    to the first candidate, as in ``GridSearchCV``.
    """
    scorer = get_scorer(scoring)
    *before, (last, final) = plan.pipeline.steps
    grid, warm, prefix = plan.grid, plan.warm_start, None
    if before and all(key.startswith(f"{last}__") for key in grid):
        prefix = Pipeline(before)
        X = prefix.fit_transform(X, y)  # as Pipeline.fit feeds the last step (PCA's fit_transform is U·S, not X·Vᵀ)
        X_val = prefix.transform(X_val)
        strip = len(last) + 2
        grid = {key[strip:]: values for key, values in grid.items()}
        warm = warm and warm[strip:]
    else:
        final = plan.pipeline
    candidates = list(ParameterGrid(grid))
    if plan.halving and len(y) >= HALVING_MIN_ROWS and len(candidates) > 1:
        candidates = _halving_search(final, candidates, X, y, X_val, y_val, seed, scorer)
    warm = warm if len(candidates) > 1 else None
    switch = f"{warm.rpartition('__')[0]}__warm_start".lstrip("_") if warm else None
    if warm:
        final = clone(final).set_params(**{switch: True})
    best = (-math.inf, None, None)
    for params in candidates:
        model = (final if warm else clone(final)).set_params(**params).fit(X, y)
        score = scorer(model, X_val, y_val)
        if score > best[0]:
            best = (score, params, copy.deepcopy(model) if warm else model)
    score, params, model = best
    if warm:
        model.set_params(**{switch: False})
    if prefix is not None:
        model = Pipeline([*prefix.steps, (last, model)])
        params = {f"{last}__{key}": value for key, value in params.items()}
    return model, params, float(score)


def _halving_search(model, candidates: list[dict], X, y, X_val, y_val, seed: int, scorer) -> list[dict]:
    """Successive halving: all candidates on 1/3^k of the training rows (at most ``HALVING_FIRST_ROWS``), the best
    third on 3× as many, …, until one is left to fit on all of them. Scored on the full validation split each round."""
    rounds = math.ceil(math.log(len(candidates), HALVING_FACTOR))
    for round_ in range(rounds):
        rows = min(len(y) // HALVING_FACTOR ** (rounds - round_), HALVING_FIRST_ROWS * HALVING_FACTOR ** round_)
        part, _ = train_test_split(np.arange(len(y)), train_size=rows, random_state=seed, stratify=y)
        scores = [scorer(clone(model).set_params(**params).fit(X[part], y[part]), X_val, y_val)
                  for params in candidates]
        keep = max(1, math.ceil(len(candidates) / HALVING_FACTOR))
        order = sorted(range(len(candidates)), key=lambda i: -scores[i])  # stable: ties keep the grid's order
        candidates = [candidates[i] for i in sorted(order[:keep])]
    return candidates


def save_head(path: Path, fitted: FittedHead, embeddings, threshold: float | None = None,
              remedies: list[dict] = (), validation_threshold: float | None = None) -> Path:
    """``path`` (JSON) and its ``.npz``: the fitted pipeline as plain data (``featx.heads.serialize``) with what it was
    trained on: class names, the embeddings' cache key and provenance, so a head is never applied to features made
    another way; ``threshold``, the decision threshold new images get (validation's, where no remedy changed it),
    and ``remedies``, the steps predict replays around the pipeline (``featx.shift.remedies.saved_steps``).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    serialize.dump(fitted.pipeline, path, {
        "format": HEAD_FORMAT, "featx_version": __version__, "head": fitted.name, "classes": list(embeddings.classes),
        "threshold": threshold, "backbone": embeddings.backbone, "cache_key": embeddings.cache_key,
        "embeddings_meta": _plain(embeddings.meta), "best_params": _plain(fitted.best_params), "note": fitted.note,
        "validation_threshold": validation_threshold, "remedies": _plain(list(remedies)),
    })
    return path


def _plain(value):
    """JSON-ready provenance: numpy scalars as Python numbers."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if isinstance(v, np.generic) else str(v)))


def load_head(path: str | Path, *, trust: bool = False, expected_cache_key: str | None = None) -> dict:
    """A saved head: what it was trained on, plus ``pipeline``.

    A head saved by this featx loads without running code (``featx.heads.serialize``). A ``.joblib`` head
    (featx before 0.2, or made elsewhere) is a pickle that runs code when loaded, so it loads only
    with ``trust=True`` (``--trust``). With ``expected_cache_key`` the head is refused unless it was
    trained on embeddings made the same way.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such head file")
    if path.suffix == ".joblib":
        head = _load_joblib(path, trust)
    else:
        head = serialize.load(path)
        if head.get("format") != HEAD_FORMAT:
            raise DataError(f"{path}: not a featx head file (expected format {HEAD_FORMAT!r})")
        head["pipeline"] = head.pop("object")
    if expected_cache_key is not None and head["cache_key"] != expected_cache_key:
        raise DataError(f"{path}: trained on embeddings {head['cache_key']} ({head['backbone']}), "
                        f"not on {expected_cache_key}; features made another way would be misread")
    return head


def _load_joblib(path: Path, trust: bool) -> dict:
    import joblib

    if not trust:
        raise DataError(f"{path}: a joblib head runs code when it is loaded; load it only if you trust where it came "
                        "from (--trust), or re-run `featx compare --out` to save heads that never run code")
    warnings.warn(f"{path}: loading a joblib head with trust: it can run any code it holds", UnsafeFileWarning,
                  stacklevel=3)
    try:
        head = joblib.load(path)
    except Exception as err:  # a damaged or foreign pickle can raise anything
        raise DataError(f"{path}: not a featx head file ({type(err).__name__})") from None
    if not isinstance(head, dict) or head.get("format") != JOBLIB_HEAD_FORMAT:
        raise DataError(f"{path}: not a featx head file (expected format {JOBLIB_HEAD_FORMAT!r})")
    return head
