"""Metrics for val and test, bootstrap confidence intervals, decision thresholds, and the leaderboard.

``compare`` is strategy 3's second half: every embedding file × every head, tuned without
touching the test split, scored on val and test, saved to a run folder. No torch here.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn import metrics as skm
from sklearn.model_selection import train_test_split

from featx.errors import ConfigError, DataError
from featx.heads import fit_head, resolve_heads, save_head
from featx.store import Embeddings, concat_embeddings, load_embeddings

log = logging.getLogger(__name__)
SORTABLE = ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc", "log_loss")
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


def bootstrap_ci(y: np.ndarray, proba: np.ndarray, pred: np.ndarray, seed: int = 0) -> dict:
    """95 % percentile intervals of accuracy and ROC-AUC over resampled rows."""
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(y), size=(BOOTSTRAP_ROUNDS, len(y)))
    accuracy = (pred[index] == y[index]).mean(axis=1)
    aucs = np.array([_auc(y[i], proba[i]) for i in index])
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
    """A decision threshold on validation rows: ``balanced_accuracy``, ``f1`` or ``sensitivity=0.95``."""
    candidates = np.unique(np.r_[p_positive, 0.5])
    if objective.startswith("sensitivity="):
        target = float(objective.split("=", 1)[1])
        positives = np.sort(p_positive[y == 1])
        if not len(positives):
            raise DataError("cannot choose a sensitivity threshold: no positive rows in validation")
        # The largest threshold that still accepts the target share of positives.
        return float(positives[int(np.floor((1 - target) * len(positives)))])
    score = {"balanced_accuracy": skm.balanced_accuracy_score, "f1": skm.f1_score}.get(objective)
    if score is None:
        raise ConfigError(f"The 'threshold' parameter must be balanced_accuracy, f1 or sensitivity=<0..1>. "
                          f"Got {objective!r} instead.")
    scores = [score(y, (p_positive >= t).astype(int)) for t in candidates]
    return float(candidates[int(np.argmax(scores))])


@dataclass
class Leaderboard:
    """One row per embedding file × head; printable, sortable, saved as CSV, markdown and JSON."""

    rows: list[dict]
    sort_by: str = "balanced_accuracy"
    details: list[dict] = field(default_factory=list, repr=False)

    COLUMNS = ("backbone", "head", "val_balanced_accuracy", "val_roc_auc", "test_accuracy", "test_accuracy_ci",
               "test_balanced_accuracy", "test_f1_macro", "test_roc_auc", "test_roc_auc_ci", "fit_s", "predict_s")

    def sorted(self, metric: str | None = None) -> "Leaderboard":
        """Rows ranked by a validation metric: ranking by test would be choosing on the test split."""
        metric = metric or self.sort_by
        if metric not in SORTABLE:
            raise ConfigError(f"The 'sort_by' parameter must be one of {', '.join(SORTABLE)}. Got {metric!r} instead.")
        sign = 1.0 if metric == "log_loss" else -1.0

        def rank(row):
            value = row.get(f"val_{metric}", float("nan"))
            return (bool(np.isnan(value)), sign * np.nan_to_num(value))

        return Leaderboard(sorted(self.rows, key=rank), metric, self.details)

    def best(self, metric: str | None = None) -> dict:
        """The row with the best validation score: choosing by test would tune on the test split."""
        return self.sorted(metric).rows[0]

    def to_markdown(self) -> str:
        columns = [c for c in self.COLUMNS if any(c in r for r in self.rows)]
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_fmt(r.get(c), seconds=c.endswith("_s")) for c in columns) + " |"
                  for r in self.rows]
        return "\n".join(lines)

    def to_csv(self) -> str:
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=keys)
        writer.writeheader()
        for r in self.rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})
        return buffer.getvalue()

    def to_json(self) -> str:
        return json.dumps(self.rows, indent=2, default=float)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "leaderboard.csv").write_text(self.to_csv())
        (folder / "leaderboard.md").write_text(self.to_markdown() + "\n")
        (folder / "leaderboard.json").write_text(self.to_json() + "\n")

    def __str__(self) -> str:
        return self.to_markdown()


def _fmt(value, seconds: bool = False) -> str:
    if isinstance(value, float):
        return "nan" if np.isnan(value) else f"{value:.2f}" if seconds else f"{value:.4f}"
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, float) for v in value):
        return f"[{value[0]:.3f}, {value[1]:.3f}]"
    return "" if value is None else str(value)


def split_arrays(emb: Embeddings, val_fraction: float, seed: int, with_copies: bool = True):
    """train / val / test arrays; val is carved from train (stratified, seeded) when the file has none.

    Augmented copies in the file (``extract --augment``) join train, but only those of images
    that stayed in train: a validation image's copies would leak it into training.
    """
    if "train" not in emb.split_names:
        raise DataError(f"{emb.path}: no 'train' rows; extract with a split (--split) first")
    X_train, y_train, train_paths = emb.features("train"), emb.labels("train"), emb.paths_of("train")
    if "val" in emb.split_names:
        X_val, y_val, val_source = emb.features("val"), emb.labels("val"), "val split of the file"
    else:
        kept, carved = train_test_split(np.arange(len(y_train)), test_size=val_fraction, random_state=seed,
                                        stratify=y_train)
        X_train, X_val, y_train, y_val = X_train[kept], X_train[carved], y_train[kept], y_train[carved]
        train_paths = train_paths[kept]
        val_source = f"{val_fraction:.0%} of train, stratified, seed {seed}"
    X_copies, y_copies = emb.augmented_copies(train_paths if with_copies else [])
    if len(y_copies):
        X_train, y_train = np.concatenate([X_train, X_copies]), np.concatenate([y_train, y_copies])
        log.info("%s: training on %d images + %d augmented copies", emb.path.name, len(train_paths), len(y_copies))
    test = (emb.features("test"), emb.labels("test")) if "test" in emb.split_names else (None, None)
    return (X_train, y_train), (X_val, y_val), test, val_source


def compare(embeddings: list[Embeddings | str | Path], heads: str | list[str] = ("logreg", "svm", "lightgbm"), *,
            cv: int | None = None, seed: int = 0, threshold: str | None = None, val_fraction: float = 0.15,
            sort_by: str = "balanced_accuracy", concat: bool = False, head_params: dict | None = None,
            out: str | Path | None = None) -> Leaderboard:
    """Tune and fit every head on every embedding file; score val and test; optionally save a run folder.

    Choices (hyper-parameters, decision threshold) use train and val only; the test split is
    scored once per head, at the end. ``concat`` adds the files' features side by side as one
    more input (several backbones of the same images). ``head_params`` maps a head name to
    pipeline parameters fixed instead of tuned (``{"logreg": {"clf__class_weight": None}}``).
    """
    files = [e if isinstance(e, Embeddings) else load_embeddings(e) for e in embeddings]
    if not files:
        raise ConfigError("compare needs at least one embedding file")
    if concat:
        if len(files) < 2:
            raise ConfigError("--concat needs at least two embedding files")
        files.append(concat_embeddings(files))
    names = resolve_heads(heads)
    out = Path(out) if out else None
    rows, details, splits = [], [], {}
    for emb in files:
        if cv and emb.n_copies:
            log.warning("%s: augmented copies are left out with --cv (an image and its copies could fall in "
                        "different folds)", emb.path.name)
        splits[emb.path.name] = split_arrays(emb, val_fraction, seed, with_copies=not cv)
        (X_train, y_train), (X_val, y_val), (X_test, y_test), val_source = splits[emb.path.name]
        for name in names:
            log.info("%s × %s: tuning on %d rows", emb.label, name, len(X_train))
            fitted = fit_head(name, X_train, y_train, X_val, y_val, cv=cv, seed=seed,
                              params=(head_params or {}).get(name))
            p_val = fitted.pipeline.predict_proba(X_val)
            chosen = None
            if threshold and len(emb.classes) == 2:
                chosen = choose_threshold(y_val, p_val[:, 1], threshold)
            elif threshold:
                log.warning("%s: a decision threshold needs two classes, not %d; using argmax",
                            emb.path.name, len(emb.classes))
            row = {"file": emb.path.name, "backbone": emb.label, "cache_key": emb.cache_key, "head": name,
                   "params": fitted.best_params, "tuned_on": fitted.tuned_on, "val_source": val_source,
                   "note": fitted.note, "threshold": chosen, "fit_s": round(fitted.fit_seconds, 2)}
            detail = {"row": row, "classes": emb.classes,
                      "val": classification_metrics(y_val, p_val, emb.classes, threshold=chosen)}
            detail["val_truth"], detail["val_proba"] = y_val, p_val
            if X_test is not None:
                began = time.perf_counter()
                p_test = fitted.pipeline.predict_proba(X_test)
                row["predict_s"] = round(time.perf_counter() - began, 3)
                detail["test"] = classification_metrics(y_test, p_test, emb.classes, threshold=chosen,
                                                        with_ci=True, seed=seed)
                detail["test_truth"], detail["test_proba"] = y_test, p_test
                detail["test_paths"] = emb.paths_of("test")
            for split in ("val", "test"):
                for metric in ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc", "log_loss",
                               "accuracy_ci", "roc_auc_ci"):
                    if split in detail and metric in detail[split]:
                        row[f"{split}_{metric}"] = detail[split][metric]
            if out:
                row["model"] = str(save_head(out / "heads", fitted, emb, chosen).relative_to(out))
            rows.append(row)
            details.append(detail)
    board = Leaderboard(rows, sort_by, details).sorted(sort_by)
    if out:
        _save_run(out, board, files, names, splits, cv=cv, seed=seed, threshold=threshold,
                  val_fraction=val_fraction, sort_by=sort_by)
    return board


def _save_run(out: Path, board: Leaderboard, files: list[Embeddings], heads: list[str], splits: dict,
              **config) -> None:
    import featx
    from featx.predict import OpenSet, save_best
    from featx.report import plot_run
    from featx.store import file_sha256

    board.save(out)
    _save_predictions(out / "predictions", board)
    best = board.best()
    (X_train, y_train), (X_val, _), _, _ = splits[best["file"]]
    val_proba = next(d["val_proba"] for d in board.details if d["row"] is best)
    save_best(out, out / best["model"], OpenSet.calibrate(X_train, y_train, X_val, val_proba, seed=config["seed"]),
              best)
    plots = plot_run(out, board)
    run = {
        "featx_version": featx.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": {"heads": heads, **config},
        "inputs": [{"path": str(e.path), "sha256": file_sha256(e.path) if e.path.exists() else None,
                    "cache_key": e.cache_key, "backbone": e.label, "classes": e.classes,
                    **({"parts": e.meta["parts"]} if "parts" in e.meta else {})} for e in files],
        "versions": _versions(),
        "results": [{**d["row"], "val": d["val"], "test": d.get("test")} for d in board.details],
        "plots": plots,
    }
    (out / "run.json").write_text(json.dumps(run, indent=2, default=_json_default) + "\n")


def _save_predictions(folder: Path, board: Leaderboard) -> None:
    """Per-image test (or val) probabilities of every head, for error analysis and the report."""
    folder.mkdir(parents=True, exist_ok=True)
    for detail in board.details:
        row, classes = detail["row"], detail["classes"]
        split = "test" if "test_proba" in detail else "val"
        proba, truth = detail[f"{split}_proba"], detail[f"{split}_truth"]
        paths = detail.get("test_paths") if split == "test" else None
        predicted = predict_labels(proba, row["threshold"])
        with open(folder / f"{Path(row['file']).stem}__{row['head']}_{split}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "truth", "predicted"] + [f"p_{c}" for c in classes])
            for i in range(len(truth)):
                writer.writerow([paths[i] if paths is not None else "", classes[truth[i]], classes[predicted[i]]]
                                + [f"{p:.6f}" for p in proba[i]])


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _versions() -> dict:
    import importlib.metadata as md

    return {p: md.version(p) for p in ("numpy", "scikit-learn", "lightgbm", "h5py", "joblib")}
