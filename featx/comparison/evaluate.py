"""Comparing embedding files × heads: tune on validation, score test once, rank on validation.

``compare`` is strategy 3's second half. It returns a ``Leaderboard`` and writes nothing;
``featx.comparison.runs.save_run`` turns one into a run folder. No torch here.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split
from threadpoolctl import threadpool_limits

from featx.shift.adapt import (fit_alignment, prior_shift as estimate_prior_shift, smooth_over_neighbours, target_threshold,
                          unexplained_shift)
from featx.shift.audit import DUPLICATE_COSINE, SHIFT_AUC, SHIFT_P, has_near_duplicate, shift_between, two_sample_test
from featx.cluster import cluster_address, connect, describe
from featx.data.datasets import carve_validation
from featx.errors import ConfigError, DataError
from featx.heads.registry import AveragedHeads, FittedHead, average_in_logit_space, fit_head, resolve_heads
from featx.heads.metrics import choose_threshold, classification_metrics
from featx.store.embeddings import Embeddings, concat_embeddings, load_embeddings
from featx.vocab import check

log = logging.getLogger(__name__)
SHIFT_CHECK_ROWS = 100  # train and test rows each before compare checks for shift (see check_shift)
REPORTED_METRICS = ("accuracy", "balanced_accuracy", "f1_macro", "roc_auc", "log_loss", "accuracy_ci", "roc_auc_ci")


@dataclass
class HeadResult:
    """One head fitted on one embedding file, with its scores and the per-row probabilities behind them."""

    row: dict  # the leaderboard row (the same object as in ``Leaderboard.rows``)
    classes: list[str]
    fitted: FittedHead
    embeddings: Embeddings
    val: dict
    val_truth: np.ndarray
    val_proba: np.ndarray
    test: dict | None = None
    test_truth: np.ndarray | None = None
    test_proba: np.ndarray | None = None
    test_paths: np.ndarray | None = None


@dataclass
class Leaderboard:
    """One row per embedding file × head; printable, sortable, and formatted as CSV, markdown and JSON.

    ``results`` keep the fitted heads and probabilities, ``splits`` the arrays each file was split
    into, and ``settings`` how the comparison ran: everything a run folder is made from.
    """

    rows: list[dict]
    sort_by: str = "balanced_accuracy"
    results: list[HeadResult] = field(default_factory=list, repr=False)
    inputs: list[Embeddings] = field(default_factory=list, repr=False)
    splits: dict = field(default_factory=dict, repr=False)
    settings: dict = field(default_factory=dict, repr=False)

    COLUMNS = ("backbone", "head", "val_balanced_accuracy", "val_roc_auc", "test_accuracy", "test_accuracy_ci",
               "test_balanced_accuracy", "test_f1_macro", "test_roc_auc", "test_roc_auc_ci", "fit_s", "predict_s")

    def sorted(self, metric: str | None = None) -> "Leaderboard":
        """Rows ranked by a validation metric: ranking by test would be choosing on the test split."""
        metric = metric or self.sort_by
        check("Leaderboard.sorted", sort_by=metric)
        sign = 1.0 if metric == "log_loss" else -1.0

        def rank(row):
            value = row.get(f"val_{metric}", float("nan"))
            return (bool(np.isnan(value)), sign * np.nan_to_num(value))

        return replace(self, rows=sorted(self.rows, key=rank), sort_by=metric)

    def best(self, metric: str | None = None) -> dict:
        """The row with the best validation score: choosing by test would tune on the test split."""
        return self.sorted(metric).rows[0]

    def result_of(self, row: dict) -> HeadResult:
        return next(r for r in self.results if r.row is row)

    def to_markdown(self) -> str:
        columns = [c for c in self.COLUMNS if any(c in r for r in self.rows)]
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(format_cell(r.get(c), seconds=c.endswith("_s")) for c in columns) + " |"
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

    def __str__(self) -> str:
        return self.to_markdown()


def format_cell(value, seconds: bool = False) -> str:
    """A leaderboard value as printed: 4 decimals, 2 for seconds, intervals as [low, high]."""
    if isinstance(value, float):
        return "nan" if np.isnan(value) else f"{value:.2f}" if seconds else f"{value:.4f}"
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, float) for v in value):
        return f"[{value[0]:.3f}, {value[1]:.3f}]"
    return "" if value is None else str(value)


def _check_classes(emb: Embeddings, y_train: np.ndarray, others: dict[str, np.ndarray]) -> None:
    """A head needs two classes to learn, and every class it is scored on among its training rows."""
    present = set(np.unique(y_train).tolist())
    if len(present) < 2:
        names = ", ".join(emb.classes[k] for k in sorted(present)) or "none"
        raise DataError(f"{emb.path}: the training rows hold {len(present)} class ({names}); a head needs at least two")
    for split, y in others.items():
        unseen = sorted(set(np.unique(y).tolist()) - present)
        if unseen:
            raise DataError(f"{emb.path}: class {', '.join(emb.classes[k] for k in unseen)} has {split} rows but no "
                            "training rows; a head cannot predict it")


def split_rows(emb: Embeddings, val_fraction: float, seed: int, check_features: bool = True):
    """Row indices of the labelled, readable train / val / test rows, and where val came from.

    Val is carved from train (stratified, seeded) when the file has none. Unlabelled rows are left out;
    a single class, a class scored but never trained on, and (with ``check_features``) rows with NaN or
    infinite features are refused with what to do. Out of core the features are not read here, and
    LightGBM takes a NaN as a missing value.
    """
    if "train" not in emb.split_names:
        raise DataError(f"{emb.path}: no 'train' rows; extract with a split (--split) first")
    finite = emb.finite_rows() if check_features else None
    rows = {}
    for split in (s for s in ("train", "val", "test") if s in emb.split_names):
        found = labelled_rows(emb, split)
        if len(found) < len(emb.rows(split)):
            log.warning("%s: %d %s rows have no label and are left out", emb.path.name,
                        len(emb.rows(split)) - len(found), split)
        if finite is not None and not finite[found].all():
            broken = found[~finite[found]]
            raise DataError(f"{emb.path}: {len(broken)} {split} rows hold NaN or infinite features (e.g. "
                            f"{emb.paths[broken[0]]}); re-extract with `featx extract … --force --precision fp32`")
        rows[split] = found
    train = rows["train"]
    _check_classes(emb, emb.labels_at(train), {split: emb.labels_at(r) for split, r in rows.items() if split != "train"})
    if "val" in rows:
        return train, rows["val"], rows.get("test"), "val split of the file"
    y_train = emb.labels_at(train)
    try:
        kept, carved = carve_validation(y_train, val_fraction, seed)
    except ValueError:  # scikit-learn's "least populated class" and "test_size" refusals
        smallest = min(Counter(y_train.tolist()).values())
        raise DataError(f"{emb.path}: {len(y_train)} training rows (the smallest class {smallest}) are too few "
                        f"to carve a stratified {val_fraction:.0%} validation split; add images or give the "
                        "data a val split") from None
    return train[kept], train[carved], rows.get("test"), f"{val_fraction:.0%} of train, stratified, seed {seed}"


def labelled_rows(emb: Embeddings, split: str) -> np.ndarray:
    """The readable rows of ``split`` that have a label: the rows a head is trained or scored on."""
    found = emb.rows(split)
    return found[emb.labels_at(found) >= 0]


def split_arrays(emb: Embeddings, val_fraction: float, seed: int, with_copies: bool = True):
    """train / val / test arrays of ``split_rows``; test is (None, None) when the file has none.

    Augmented copies in the file (``extract --augment``) join train, but only those of images
    that stayed in train: a validation image's copies would leak it into training.
    """
    train, val, test, val_source = split_rows(emb, val_fraction, seed)

    def arrays(rows):
        return emb.features_at(rows), emb.labels_at(rows)

    (X_train, y_train), train_paths = arrays(train), emb.paths[train]
    X_copies, y_copies = emb.augmented_copies(train_paths if with_copies else [])
    if len(y_copies):
        X_train, y_train = np.concatenate([X_train, X_copies]), np.concatenate([y_train, y_copies])
        log.info("%s: training on %d images + %d augmented copies", emb.path.name, len(train_paths), len(y_copies))
    return (X_train, y_train), arrays(val), arrays(test) if test is not None else (None, None), val_source


def distinct_inputs(files: list[Embeddings]) -> list[Embeddings]:
    """Each embedding file once, and rows that can be told apart.

    The same embeddings given twice (one cache key; a shell glob over copies) are compared once, with a
    warning; different files of one backbone (another fit, layer or dataset) get their cache key in
    the label, so their leaderboard rows do not look alike.
    """
    first: dict[str, Embeddings] = {}
    for emb in files:
        if emb.cache_key in first:
            log.warning("%s: the same embeddings as %s (cache key %s); compared once", emb.path,
                        first[emb.cache_key].path, emb.cache_key)
        else:
            first[emb.cache_key] = emb
    kept = list(first.values())
    labels = Counter(emb.label for emb in kept)
    return [emb if labels[emb.label] == 1 else replace(emb, meta={**emb.meta, "label": f"{emb.label} [{emb.cache_key}]"})
            for emb in kept]


def subsample_train(y: np.ndarray, max_rows: int, seed: int) -> np.ndarray:
    """Indices of a stratified, seeded sample of ``max_rows`` training rows (every class keeps its share)."""
    if max_rows >= len(y):
        return np.arange(len(y))
    kept, _ = train_test_split(np.arange(len(y)), train_size=max_rows, random_state=seed, stratify=y)
    return np.sort(kept)


def _fit_and_score(name: str, X_train, y_train, X_val, y_val, X_test, *, cv, seed, params):
    """One head on one file: tune and fit, then its validation and test probabilities (a task on a cluster)."""
    fitted = fit_head(name, X_train, y_train, X_val, y_val, cv=cv, seed=seed, params=params)
    p_val = fitted.pipeline.predict_proba(X_val)
    p_test, predict_s = None, None
    if X_test is not None:
        began = time.perf_counter()
        p_test = fitted.pipeline.predict_proba(X_test)
        predict_s = round(time.perf_counter() - began, 3)
    return fitted, p_val, p_test, predict_s


def _decided(outcome: tuple, split: tuple, *, threshold, smooth=0) -> tuple:
    """What is chosen on a fitted head's scores, as ``_head_result`` takes them.

    ``smooth`` spreads each split's probabilities over its own images' neighbours before anything is chosen
    on them; ``threshold="mixture"`` chooses validation's threshold for balanced accuracy and the test images'
    own (``adapt.target_threshold``), returned last.
    """
    fitted, p_val, p_test, predict_s = outcome
    (_, _), (X_val, y_val), (X_test, _), _ = split
    if smooth:
        p_val = smooth_over_neighbours(X_val, p_val, smooth)
        p_test = smooth_over_neighbours(X_test, p_test, smooth) if p_test is not None else None
    binary = threshold and p_val.shape[1] == 2
    chosen = choose_threshold(y_val, p_val[:, 1], threshold) if binary else None
    test_cut = None
    if binary and threshold == "mixture" and p_test is not None:
        test_cut = target_threshold(p_val, y_val, chosen, p_test)
    return fitted, p_val, chosen, p_test, predict_s, test_cut


def averaged_input(parts: list[Embeddings]) -> Embeddings:
    """The files' features side by side under a name of their own: the rows of ``--ensemble`` (each head
    averaged over the files) are saved under it, and spread over neighbours and calibrated for open-set
    scores in all the files' features at once. Augmented copies are left out: each member trains on its own."""
    parts = [part.without_copies() for part in parts]
    joined = concat_embeddings(parts)
    for part in parts:  # each head must score the same images, so that their scores can be averaged row by row
        if not np.array_equal(part.ok, joined.ok):
            raise DataError(f"{part.path}: some images readable here are unreadable in another file; --ensemble "
                            "needs the same images readable in every file")
    return replace(joined, path=joined.path.with_suffix(".averaged.h5"),
                   meta={**joined.meta, "label": f"{joined.label} averaged"})


def _averaged(name: str, averaged: Embeddings, members: list[Embeddings], outcomes: list[tuple],
              splits: dict) -> tuple:
    """One head fitted on each member file, as one head: their probabilities averaged in logit space
    (``heads.AveragedHeads``); every file scored the same images (``averaged_input`` checked)."""
    y_test = splits[averaged.path.name][2][1]
    ends = np.cumsum([m.dim for m in members]).tolist()
    fitted = [outcome[0] for outcome in outcomes]
    head = FittedHead(
        name=name, pipeline=AveragedHeads([f.pipeline for f in fitted], list(zip([0] + ends[:-1], ends))),
        best_params={m.label: f.best_params for m, f in zip(members, fitted)},
        tuning_score=float(np.mean([f.tuning_score for f in fitted])), tuned_on=fitted[0].tuned_on,
        note=f"the {name} head of each of {len(members)} files, averaged in logit space",
        fit_seconds=sum(f.fit_seconds for f in fitted))
    p_val = average_in_logit_space([outcome[1] for outcome in outcomes])
    p_test = average_in_logit_space([outcome[2] for outcome in outcomes]) if y_test is not None else None
    predict_s = sum(outcome[3] for outcome in outcomes) if y_test is not None else None
    return head, p_val, p_test, predict_s


def compare(embeddings: list[Embeddings | str | Path], heads: str | list[str] = ("logreg", "svm", "lightgbm"), *,
            cv: int | None = None, seed: int = 0, threshold: str | None = None, val_fraction: float = 0.15,
            sort_by: str = "balanced_accuracy", concat: bool = False, head_params: dict | None = None,
            max_train_rows: int | None = None, cluster: str | None = None, out_of_core: bool = False,
            exclude_leaked: bool = False, duplicate_cosine: float | None = None, align: str = "none",
            prior_shift: str = "off", smooth_test: int = 0, ensemble: bool = False) -> Leaderboard:
    """Tune and fit every head on every embedding file; score val and test; return the ranked leaderboard.

    Choices (hyper-parameters, decision threshold) use train and val only; the test split is
    scored once per head, at the end. ``concat`` adds the files' features side by side as one
    more input (several backbones of the same images); ``ensemble`` adds, for each head, that head fitted on
    each file and averaged in logit space (``heads.AveragedHeads``). ``head_params`` maps a head name to
    pipeline parameters fixed instead of tuned (``{"logreg": {"clf__class_weight": None}}``).
    ``max_train_rows`` trains on a stratified, seeded sample of the training rows. ``cluster`` (a
    Dask address) fits the file × head grid as parallel tasks; the leaderboard is the same.
    ``out_of_core`` trains the lightgbm head on the cluster over the file itself, for training rows
    that do not fit in this machine's memory (``featx.heads.outofcore``).

    Without reading test labels: ``exclude_leaked`` scores test without its images that have a near-duplicate
    (cosine ≥ ``duplicate_cosine``) among the labelled ones, and reports the figures with them too; ``align``
    maps train and val features towards the test images (``featx.shift.adapt``); ``prior_shift`` estimates the test
    images' class balance (``estimate``) and re-weights the probabilities to it where validation shows it helps
    (``auto``); ``smooth_test`` spreads each scored split's probabilities over its ``smooth_test`` nearest images
    of the same split (validation's too, so that its choices are made on scores like the test ones); a
    ``threshold`` of ``mixture`` cuts the test images' scores where they part into two groups, where validation
    shows the rule holds (``featx.shift.adapt.target_threshold``).
    """
    check("compare", cv=cv, seed=seed, threshold=threshold, val_fraction=val_fraction, sort_by=sort_by,
          max_train_rows=max_train_rows, align=align, prior_shift=prior_shift, duplicate_cosine=duplicate_cosine,
          smooth_test=smooth_test)
    names = resolve_heads(heads)
    files = distinct_inputs([e if isinstance(e, Embeddings) else load_embeddings(e, lazy=out_of_core)
                             for e in embeddings])
    settings = {"heads": names, "cv": cv, "seed": seed, "threshold": threshold, "val_fraction": val_fraction,
                "sort_by": sort_by}
    adapting = exclude_leaked or align != "none" or prior_shift != "off" or smooth_test or threshold == "mixture"
    if out_of_core and (adapting or ensemble):
        raise ConfigError("--exclude-leaked, --align, --prior-shift, --smooth-test, --threshold mixture and "
                          "--ensemble work in memory; leave out --out-of-core")
    for used, value in (("smooth_test", smooth_test), ("ensemble", ensemble)):
        if value:  # recorded only when used, so earlier run folders' configs read the same
            settings[used] = value
    for emb in files:
        guessed = guessed_test_images(emb)
        if guessed:
            settings.setdefault("transductive", {})[emb.path.name] = {"test_images_trained_on": guessed}
        leaked = validation_trained_on(emb, val_fraction, seed)
        if leaked:
            settings.setdefault("validation_trained_on", {})[emb.path.name] = leaked
    if ensemble or concat:
        warn_mixed_validation(files)
    if out_of_core:
        return _compare_out_of_core(files, names, settings, cluster)
    if not files:
        raise ConfigError("compare needs at least one embedding file")
    members, averaged = list(files), None
    if concat:
        if len(files) < 2:
            raise ConfigError("--concat needs at least two embedding files")
        files.append(concat_embeddings(files))
    if ensemble:
        if len(members) < 2:
            raise ConfigError("--ensemble needs at least two embedding files")
        averaged = averaged_input(members)
        files.append(averaged)
    splits, jobs, test_extra = {}, [], {}
    for emb in files:
        if cv and emb.n_copies:
            log.warning("%s: augmented copies are left out with --cv (an image and its copies could fall in "
                        "different folds)", emb.path.name)
        (X_train, y_train), val, test, val_source = split_arrays(emb, val_fraction, seed, with_copies=not cv)
        if max_train_rows and max_train_rows < len(y_train):
            kept = subsample_train(y_train, max_train_rows, seed)
            log.info("%s: training on %d of %d rows (a stratified sample, seed %d)", emb.path.name, len(kept),
                     len(y_train), seed)
            X_train, y_train = X_train[kept], y_train[kept]
        shift = check_shift(emb, seed) if emb is not averaged else None  # its members' are checked
        if shift:  # recorded only when there was a test split to check
            settings.setdefault("shift", {})[emb.path.name] = shift
        if adapting:
            (X_train, y_train), val, test_extra[emb.path.name] = _adapt(
                emb, (X_train, y_train), val, test, align=align if emb is not averaged else "none",  # members aligned
                exclude_leaked=exclude_leaked and emb is not averaged,
                duplicate_cosine=duplicate_cosine or DUPLICATE_COSINE, prior_shift=prior_shift, seed=seed,
                settings=settings)
            if exclude_leaked and emb is averaged:  # a test image leaked in any member's features: not scored
                leaked = np.logical_or.reduce([test_extra[m.path.name]["leaked"] for m in members])
                test_extra[emb.path.name]["leaked"] = leaked
                settings["exclude_leaked"][emb.path.name] = {"of_members": True, "test_rows": int(leaked.sum())}
        splits[emb.path.name] = ((X_train, y_train), val, test, val_source)
        if threshold and len(emb.classes) != 2:
            log.warning("%s: a decision threshold needs two classes, not %d; using argmax", emb.path.name,
                        len(emb.classes))
        for name in names if emb is not averaged else ():
            log.info("%s × %s: tuning on %d rows", emb.label, name, len(X_train))
            jobs.append((emb, name))
    outcomes = _run_jobs([(name, *splits[emb.path.name][0], *splits[emb.path.name][1], splits[emb.path.name][2][0])
                          for emb, name in jobs], cv=cv, seed=seed, head_params=head_params or {}, cluster=cluster)
    scored = list(zip(jobs, outcomes))
    if averaged:
        of = {(emb.path.name, name): outcome for (emb, name), outcome in scored}
        scored += [((averaged, name), _averaged(name, averaged, members, [of[m.path.name, name] for m in members],
                                                splits)) for name in names]
    results = [_head_result(emb, name, splits[emb.path.name],
                            _decided(outcome, splits[emb.path.name], threshold=threshold, smooth=smooth_test), seed,
                            test_extra.get(emb.path.name))
               for (emb, name), outcome in scored]
    if max_train_rows:  # recorded only when used, so earlier run folders' configs read the same
        settings["max_train_rows"] = max_train_rows
    return Leaderboard([r.row for r in results], sort_by, results, files, splits, settings).sorted(sort_by)


def guessed_test_images(emb: Embeddings) -> int:
    """How many test images the file's fine-tuned backbone trained on with guessed labels (``finetune
    --pseudo-labels``); its test figures are then transductive, not a held-out estimate, and compare says so."""
    guessed = ((emb.meta.get("backbone_pseudo_labels") or {}).get("splits") or {}).get("test", 0)
    if guessed:
        log.warning("%s: its backbone trained on %d test images with guessed labels (featx finetune "
                    "--pseudo-labels): its test figures are transductive, not a held-out estimate", emb.path.name,
                    guessed)
    return guessed


def validation_trained_on(emb: Embeddings, val_fraction: float, seed: int) -> dict | None:
    """Validation images that the file's fine-tuned backbone trained on: its fine-tune carved validation with
    another seed or fraction than this compare. Validation figures, and every choice made on them, are then
    optimistic, and compare says so; None when there are none, or the file does not say what it held out."""
    held_out = emb.meta.get("backbone_validation")
    if not held_out:
        return None
    _, val, _, _ = split_rows(emb, val_fraction, seed, check_features=False)
    trained = int(np.count_nonzero(~np.isin(emb.paths[val], held_out["images"])))
    if not trained:
        return None
    log.warning("%s: %d of its %d validation images trained its fine-tuned backbone, which held out others "
                "(featx finetune --val-seed %s --val-fraction %s): validation figures and the choices made on them are "
                "optimistic; compare with that --seed and --val-fraction", emb.path.name, trained, len(val),
                held_out["seed"], held_out["val_fraction"])
    return {"images": trained, "of": len(val), "finetune_seed": held_out["seed"],
            "finetune_val_fraction": held_out["val_fraction"]}


def warn_mixed_validation(files: list[Embeddings]) -> None:
    """Fine-tuned files that held out different validation images: whatever compare's --seed, some of them trained
    on its validation images, so their average (or concatenation) is never validated cleanly; one --val-seed for
    every fine-tune is the cure."""
    carves = sorted({(held["seed"], held["val_fraction"]) for held in
                     (emb.meta.get("backbone_validation") for emb in files) if held})
    if len(carves) > 1:
        log.warning("the fine-tuned files held out different validation images (carved with seeds %s): no compare "
                    "--seed validates them together on images none of them trained on; fine-tune them with one "
                    "--val-seed", ", ".join(f"{s} (fraction {f})" for s, f in carves))


def check_shift(emb: Embeddings, seed: int) -> dict | None:
    """The audit's shift test of train against test, kept quick for every compare (permutations only when the
    AUC is high enough to matter); warns when validation figures are likely optimistic. None without a test split
    of ``SHIFT_CHECK_ROWS`` rows: below that, chance alone moves the AUC past the threshold too often to warn on."""
    try:
        if min(len(emb.rows("train")), len(emb.rows("test"))) < SHIFT_CHECK_ROWS:
            return None
    except DataError:  # no test split
        return None
    report = shift_between(emb, "train", "test", seed, permutations=99, permute_above=SHIFT_AUC)
    if report.shifted:
        worst = max([report.overall, *report.per_class.values()], key=lambda t: t.auc)
        log.warning("%s: the test images differ from the training ones (shift AUC up to %.2f, p ≤ %.2f): "
                    "validation figures are likely optimistic for test; see `featx audit %s`", emb.path.name,
                    worst.auc, SHIFT_P, emb.path)
    return report.summary()


def _adapt(emb: Embeddings, train: tuple, val: tuple, test: tuple, *, align: str, exclude_leaked: bool,
           duplicate_cosine: float, prior_shift: str, seed: int, settings: dict):
    """The remedies for shift and leakage that need no test label: train and val mapped towards the test images,
    and what scoring test needs to know (its leaked rows, the prior-shift mode), recorded in ``settings``."""
    (X_train, y_train), (X_val, y_val), (X_test, _) = train, val, test
    if X_test is None:
        raise ConfigError(f"{emb.path}: --exclude-leaked, --align, --prior-shift, --smooth-test and --threshold "
                          "mixture need a test split (the images whose figures they correct)")
    extra = {"prior_shift": prior_shift, "leaked": None, "train": (X_train, y_train), "test": X_test}
    if exclude_leaked:
        extra["leaked"] = has_near_duplicate(X_test, np.concatenate([X_train, X_val]), duplicate_cosine)
        count = int(extra["leaked"].sum())
        settings.setdefault("exclude_leaked", {})[emb.path.name] = {"cosine": duplicate_cosine, "test_rows": count}
        log.info("%s: %d of %d test images have a near-duplicate among the labelled ones (cosine ≥ %s); scored "
                 "without them, and with them for comparison", emb.path.name, count, len(X_test), duplicate_cosine)
        if count > len(X_test) / 2:
            log.warning("%s: %d of %d test images count as leaked at cosine ≥ %s: too low a threshold for images "
                        "this alike; `featx audit %s` suggests one", emb.path.name, count, len(X_test),
                        duplicate_cosine, emb.path)
    if align != "none":
        alignment = fit_alignment(X_train, X_test, align)
        X_train, X_val = alignment.apply(X_train), alignment.apply(X_val)
        after = two_sample_test(X_train, X_test, seed, permute_above=1.0)  # the AUC alone: how alike now
        settings.setdefault("align", {})[emb.path.name] = {"method": align, "shift_auc_after": round(after.auc, 4)}
    return (X_train, y_train), (X_val, y_val), extra


def _head_result(emb: Embeddings, name: str, split: tuple, outcome: tuple, seed: int,
                 adapt: dict | None = None) -> HeadResult:
    """The leaderboard row and the scores of one head fitted on one file (with ``_adapt``'s corrections)."""
    fitted, p_val, chosen, p_test, predict_s, test_cut = outcome
    (_, _), (_, y_val), (_, y_test), val_source = split
    row = {"file": emb.path.name, "backbone": emb.label, "cache_key": emb.cache_key, "head": name,
           "params": fitted.best_params, "tuned_on": fitted.tuned_on, "val_source": val_source,
           "note": fitted.note, "threshold": chosen, "fit_s": round(fitted.fit_seconds, 2)}
    if test_cut:
        row["test_threshold"] = test_cut
    on_test = decision_threshold(row, "test")
    result = HeadResult(row, emb.classes, fitted, emb,
                        classification_metrics(y_val, p_val, emb.classes, threshold=chosen), y_val, p_val)
    if p_test is not None:
        row["predict_s"] = predict_s
        test_paths = emb.paths[labelled_rows(emb, "test")]
        if adapt and adapt["leaked"] is not None:
            with_leaked = classification_metrics(y_test, p_test, emb.classes, threshold=on_test)
            row.update(test_leaked_rows=int(adapt["leaked"].sum()), test_with_leaked_accuracy=with_leaked["accuracy"],
                       test_with_leaked_roc_auc=with_leaked["roc_auc"])
            kept = ~adapt["leaked"]
            p_test, y_test, test_paths = p_test[kept], y_test[kept], test_paths[kept]
        if adapt and adapt["prior_shift"] != "off":
            p_test = _prior_shift(row, adapt, p_val, y_val, p_test, emb.classes, chosen, seed)
        result.test = classification_metrics(y_test, p_test, emb.classes, threshold=on_test, with_ci=True, seed=seed)
        result.test_truth, result.test_proba, result.test_paths = y_test, p_test, test_paths
    for split_name, scores in (("val", result.val), ("test", result.test)):
        for metric in REPORTED_METRICS:
            if scores is not None and metric in scores:
                row[f"{split_name}_{metric}"] = scores[metric]
    return result


def decision_threshold(row: dict, split: str) -> float | None:
    """The decision threshold a row applies to ``split``: validation's; on test (and in the head saved for new
    images) the test images' own where ``--threshold mixture`` found and kept one."""
    if split == "val":
        return row["threshold"]
    return (row.get("test_threshold") or {}).get("value", row["threshold"])


def _prior_shift(row: dict, adapt: dict, p_val, y_val, p_test, classes: list[str], threshold, seed: int):
    """The test images' estimated class balance in ``row``; with ``auto``, the test probabilities re-weighted to
    it when a simulated prior change on validation showed that helps, and the change of balance explains how
    the test images differ from the training ones (``adapt.unexplained_shift``). Never with a decision
    threshold, which was chosen for the validation balance."""
    found = estimate_prior_shift(p_val, y_val, p_test, seed)
    summary = found.summary(classes)
    apply = adapt["prior_shift"] == "auto" and found.applied and threshold is None
    if apply:
        left = unexplained_shift(*adapt["train"], adapt["test"], found.target, seed)
        summary["shift_after_reweighting_train"] = {"auc": round(left.auc, 4), "p_value": left.p_value}
        apply = not left.shifted
    row["prior_shift"] = {**summary, "applied": apply}
    return found.adjust(p_test) if apply else p_test


OPEN_SET_SAMPLE = 20_000  # training rows brought into memory for the open-set calibration of an out-of-core run


def _compare_out_of_core(files: list[Embeddings], names: list[str], settings: dict, cluster) -> Leaderboard:
    """The lightgbm head trained on the cluster over each file's training rows, read where the tasks run."""
    from featx.heads.outofcore import fit_lightgbm

    address = cluster_address(cluster)
    if not address:
        raise ConfigError("--out-of-core needs --cluster: the workers train LightGBM together")
    if names != ["lightgbm"] or settings["cv"]:
        others = ", ".join(n for n in names if n != "lightgbm") or "--cv"
        raise DataError(f"{others} keep every training row in memory and cannot train out of core; compare them "
                        "with --max-train-rows N (a stratified sample), or use --heads lightgbm alone")
    seed, threshold = settings["seed"], settings["threshold"]
    splits, results = {}, []
    with connect(address) as client:
        log.info(describe(client))
        for emb in files:
            labels = emb.labels_at()
            train, val, test, val_source = split_rows(emb, settings["val_fraction"], seed, check_features=False)
            train = np.sort(train)  # read block by block in file order
            X_val, y_val = emb.features_at(val), labels[val]
            X_test = emb.features_at(test) if test is not None else None
            fitted = fit_lightgbm(client, emb, train, X_val, y_val, seed)
            p_val = fitted.pipeline.predict_proba(X_val)
            began = time.perf_counter()
            p_test = fitted.pipeline.predict_proba(X_test) if X_test is not None else None
            sample = train[subsample_train(labels[train], OPEN_SET_SAMPLE, seed)]
            splits[emb.path.name] = ((emb.features_at(sample), labels[sample]), (X_val, y_val),
                                     (X_test, labels[test] if test is not None else None), val_source)
            outcome = fitted, p_val, p_test, round(time.perf_counter() - began, 3)
            results.append(_head_result(emb, "lightgbm", splits[emb.path.name],
                                        _decided(outcome, splits[emb.path.name], threshold=threshold), seed))
    settings["out_of_core"] = True
    sort_by = settings["sort_by"]
    return Leaderboard([r.row for r in results], sort_by, results, files, splits, settings).sorted(sort_by)


def _run_jobs(jobs: list[tuple], *, cv, seed, head_params, cluster) -> list[tuple]:
    """``_fit_and_score`` for every (head, arrays) job: here one by one, or as parallel tasks on a Dask cluster
    through joblib's Dask backend. Either way the outcomes come back in the jobs' order.

    Here, as on a cluster's workers, BLAS and OpenMP run one thread: the same sums to the last bit, so the
    same leaderboard either way (lightgbm's bins, cut from PCA features, moved with the thread count); on a
    2-core Intel Xeon the flowers5 comparison also took 17.4 s instead of 20.7 s.
    """
    score = functools.partial(_fit_and_score, cv=cv, seed=seed)
    address = cluster_address(cluster)
    if not address:
        with threadpool_limits(limits=1):
            return [score(name, *arrays, params=head_params.get(name)) for name, *arrays in jobs]
    import joblib

    with connect(address) as client, joblib.parallel_backend("dask"):
        log.info(describe(client))
        return joblib.Parallel(n_jobs=-1)(joblib.delayed(score)(name, *arrays, params=head_params.get(name))
                                          for name, *arrays in jobs)
