"""Comparing embedding files × heads: tune on validation, score test once, rank on validation.

``compare`` is strategy 3's second half. It returns a ``Leaderboard`` and writes nothing;
``featx.comparison.runs.save_run`` turns one into a run folder. No torch here.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split
from threadpoolctl import threadpool_limits

from featx.cluster import cluster_address, connect, describe
from featx.comparison.config import CompareConfig
from featx.comparison.leaderboard import REPORTED_METRICS, HeadResult, Leaderboard
from featx.data.datasets import carve_validation
from featx.errors import ConfigError, DataError
from featx.heads.metrics import choose_threshold, classification_metrics, predict_labels
from featx.heads.registry import AveragedHeads, FittedHead, average_in_logit_space, fit_head, resolve_heads
from featx.shift.audit import SHIFT_AUC, SHIFT_P, shift_between
from featx.shift.remedies import get_remedy, in_extraction, requested, saved_steps
from featx.shift.remedy import Context, Fitted, Scores, Split, Splits
from featx.store.embeddings import Embeddings, concat_embeddings, load_embeddings

log = logging.getLogger(__name__)
SHIFT_CHECK_ROWS = 100  # train and test rows each before compare checks for shift (see check_shift)
# Train values (rows × features) from which heads are fitted in parallel processes here: below, starting the
# processes costs more than it saves.
PARALLEL_MIN_VALUES = 5_000_000


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
    absent = [k for k in range(len(emb.classes)) if k not in present]
    if absent:  # every image of the class unreadable: the head would know fewer classes than the file names
        unreadable = int(np.isin(emb.labels_at(np.flatnonzero(~emb.ok)), absent).sum())
        raise DataError(f"{emb.path}: class {', '.join(emb.classes[k] for k in absent)} has no readable training "
                        f"rows ({unreadable} of its images unreadable); mend or remove those images and extract "
                        f"again (`featx info {emb.path}` lists them)")


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
            log.warning("%s: %d %s rows have no label and are left out", emb.name,
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


def split_arrays(emb: Embeddings, val_fraction: float, seed: int, with_copies: bool = True) -> Splits:
    """The ``Splits`` of ``split_rows``: features, labels and paths of train, val and test (None without one).

    Augmented copies in the file (``extract --augment``) join train, but only those of images
    that stayed in train: a validation image's copies would leak it into training.
    """
    train, val, test, val_source = split_rows(emb, val_fraction, seed)

    def split(rows) -> Split:
        return Split(emb.features_at(rows), emb.labels_at(rows), emb.paths[rows])

    images = split(train)
    X_copies, y_copies = emb.augmented_copies(images.paths if with_copies else [])
    if len(y_copies):
        images = Split(np.concatenate([images.features, X_copies]), np.concatenate([images.labels, y_copies]))
        log.info("%s: training on %d images + %d augmented copies", emb.name, len(train), len(y_copies))
    return Splits(images, split(val), split(test) if test is not None else None, val_source)


def distinct_inputs(files: list[Embeddings]) -> list[Embeddings]:
    """Each embedding file once, and rows that can be told apart.

    The same embeddings given twice (one cache key; a shell glob over copies) are compared once, with a
    warning; different files of one backbone (another fit, layer or dataset) get their cache key in
    the label, so their leaderboard rows do not look alike, and files of one name from different folders in
    their ``name``, which keys everything of theirs in the leaderboard and the run folder.
    """
    first: dict[str, Embeddings] = {}
    for emb in files:
        if emb.cache_key in first:
            log.warning("%s: the same embeddings as %s (cache key %s); compared once", emb.path,
                        first[emb.cache_key].path, emb.cache_key)
        else:
            first[emb.cache_key] = emb
    kept = list(first.values())
    labels, names = Counter(emb.label for emb in kept), Counter(emb.name for emb in kept)
    return [replace(emb, meta={**emb.meta,
                               **({"label": f"{emb.label} [{emb.cache_key}]"} if labels[emb.label] > 1 else {}),
                               **({"name": f"{emb.path.stem}-{emb.cache_key}{emb.path.suffix}"}
                                  if names[emb.name] > 1 else {})})
            for emb in kept]


def subsample_train(y: np.ndarray, max_rows: int, seed: int) -> np.ndarray:
    """Indices of a stratified, seeded sample of ``max_rows`` training rows (every class keeps its share)."""
    if max_rows >= len(y):
        return np.arange(len(y))
    kept, _ = train_test_split(np.arange(len(y)), train_size=max_rows, random_state=seed, stratify=y)
    return np.sort(kept)


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
    name = Path(joined.name).stem + ".averaged.h5"
    return replace(joined, path=Path(name), meta={**joined.meta, "label": f"{joined.label} averaged", "name": name})


def guessed_test_images(emb: Embeddings) -> int:
    """How many test images the file's fine-tuned backbone trained on with guessed labels (``finetune
    --pseudo-labels``); its test figures are then transductive, not a held-out estimate, and compare says so."""
    guessed = ((emb.meta.get("backbone_pseudo_labels") or {}).get("splits") or {}).get("test", 0)
    if guessed:
        log.warning("%s: its backbone trained on %d test images with guessed labels (featx finetune "
                    "--pseudo-labels): its test figures are transductive, not a held-out estimate", emb.name,
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
                "optimistic; compare with that --seed and --val-fraction", emb.name, trained, len(val),
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
                    "validation figures are likely optimistic for test; see `featx audit %s`", emb.name,
                    worst.auc, SHIFT_P, emb.path)
    return report.summary()


@dataclass(frozen=True)
class HeadOutcome:
    """One head fitted on one input: the fitted head, its validation and test probabilities, its predict time."""

    fitted: FittedHead
    val_proba: np.ndarray
    test_proba: np.ndarray | None
    predict_s: float | None


@dataclass(frozen=True)
class PreparedInput:
    """One input as its heads see it: its splits after the features-stage remedies; ``steps`` what predict replays
    of those (with the columns each applies to, for a member of ``--ensemble``), ``fitted`` one per remedy that
    made or changed its features (run.json's record, and the test rows left unscored)."""

    embeddings: Embeddings
    splits: Splits
    steps: list[tuple[Fitted, tuple[int, int] | None]]
    fitted: list[Fitted]

    @property
    def unscored(self) -> np.ndarray | None:
        masks = [f.unscored for f in self.fitted if f.unscored is not None]
        return np.logical_or.reduce(masks) if masks else None


def compare(embeddings: list[Embeddings | str | Path], heads: str | list[str] = ("logreg", "svm", "lightgbm"), *,
            config: CompareConfig | None = None, **options) -> Leaderboard:
    """Tune and fit every head on every embedding file; score val and test; return the ranked leaderboard.

    Choices (hyper-parameters, decision threshold) use train and val only; the test split is scored once per
    head, at the end. ``options`` are ``CompareConfig``'s fields (or pass ``config``), and the parameters of
    remedies registered from outside featx: each remedy asked for (``featx.shift.remedies``) is fitted on each
    input's features, then on each head's scores, without reading a test label, and recorded in the rows and
    ``settings`` as run.json keeps them.
    """
    config = config or CompareConfig.from_options(**options)
    names = resolve_heads(heads)
    files = distinct_inputs([e if isinstance(e, Embeddings) else load_embeddings(e, lazy=config.out_of_core)
                             for e in embeddings])
    if not files:
        raise ConfigError("compare needs at least one embedding file")
    for joined, flag in ((config.concat, "--concat"), (config.ensemble, "--ensemble")):
        if joined and len(files) < 2:
            raise ConfigError(f"{flag} needs at least two embedding files")
    asked = requested(config.options(), "features") + requested(config.options(), "scores")
    if config.out_of_core and (asked or config.ensemble):
        raise ConfigError(f"{_flags(asked) + ', --ensemble' * config.ensemble} work in memory; leave out --out-of-core"
                          .lstrip(", "))
    settings = {"heads": names, "cv": config.cv, "seed": config.seed, "threshold": config.threshold,
                "val_fraction": config.val_fraction, "sort_by": config.sort_by, **config.changed()}
    _record_backbones(files, config, settings)
    if config.out_of_core:
        return _compare_out_of_core(files, names, config, settings)
    prepared = [_prepare(emb, config, settings) for emb in files]
    if config.concat:
        prepared.append(_prepare(concat_embeddings(files), config, settings))
    jobs = [(each, name) for each in prepared for name in names]
    for each, name in jobs:
        log.info("%s × %s: tuning on %d rows", each.embeddings.label, name, len(each.splits.train))
    scored = list(zip(jobs, _run_jobs([(name, each.splits) for each, name in jobs], config)))
    if config.ensemble:
        members = prepared[:len(files)]
        averaged = _averaged_input(members, config, settings)
        of = {(each.embeddings.name, name): outcome for (each, name), outcome in scored}
        scored += [((averaged, name), _averaged(name, [of[m.embeddings.name, name] for m in members], members))
                   for name in names]
        prepared.append(averaged)
    results = [_score(each, name, outcome, config) for (each, name), outcome in scored]
    return Leaderboard([r.row for r in results], config.sort_by, results, [p.embeddings for p in prepared],
                       {p.embeddings.name: p.splits for p in prepared}, settings).sorted(config.sort_by)


def _flags(asked: list) -> str:
    """Remedies as they are asked for on the command line: ``--align coral, --exclude-leaked``."""
    return ", ".join(f"--{remedy.parameter.replace('_', '-')}" + ("" if value is True else f" {value}")
                     for remedy, value in asked)


def _record_backbones(files: list[Embeddings], config: CompareConfig, settings: dict) -> None:
    """What fine-tuned backbones make optimistic (test images trained on, validation images trained on), in
    ``settings`` and as warnings."""
    for emb in files:
        guessed = guessed_test_images(emb)
        if guessed:
            settings.setdefault("transductive", {})[emb.name] = {"test_images_trained_on": guessed}
        trained_on = validation_trained_on(emb, config.val_fraction, config.seed)
        if trained_on:
            settings.setdefault("validation_trained_on", {})[emb.name] = trained_on
    if config.ensemble or config.concat:
        warn_mixed_validation(files)


def _splits(emb: Embeddings, config: CompareConfig) -> Splits:
    """``split_arrays`` with compare's options: no augmented copies with ``cv``, a sample of ``max_train_rows``."""
    if config.cv and emb.n_copies:
        log.warning("%s: augmented copies are left out with --cv (an image and its copies could fall in different "
                    "folds)", emb.name)
    splits = split_arrays(emb, config.val_fraction, config.seed, with_copies=not config.cv)
    train = splits.train
    if config.max_train_rows and config.max_train_rows < len(train):
        kept = subsample_train(train.labels, config.max_train_rows, config.seed)
        log.info("%s: training on %d of %d rows (a stratified sample, seed %d)", emb.name, len(kept), len(train),
                 config.seed)
        splits = replace(splits, train=Split(train.features[kept], train.labels[kept]))
    if config.threshold and len(emb.classes) != 2:
        log.warning("%s: a decision threshold needs two classes, not %d; using argmax", emb.name,
                    len(emb.classes))
    return splits


def _recipes(emb: Embeddings) -> list[dict]:
    """The extraction configs an input's features were made with (one per backbone of a joined input)."""
    return [meta.get("config") or {} for meta in emb.meta.get("part_meta") or [emb.meta]]


def _prepare(emb: Embeddings, config: CompareConfig, settings: dict) -> PreparedInput:
    """One input's splits, its shift checked (train against test), and the features-stage remedies fitted on it
    in turn, each on what the ones before it left."""
    splits, options = _splits(emb, config), config.options()
    shift = check_shift(emb, config.seed)
    if shift:  # recorded only when there was a test split to check
        settings.setdefault("shift", {})[emb.name] = shift
    asked = requested(options, "features")
    needing = [(r, v) for r, v in asked + requested(options, "scores") if r.needs_test]
    if needing and splits.test is None:
        raise ConfigError(f"{emb.path}: {_flags(needing)} need a test split (the images whose figures they correct)")
    fitted, steps = in_extraction(_recipes(emb)), []
    for remedy, value in asked:
        found = remedy.fit(value, Context(emb.name, emb.classes, options, config.seed, splits))
        splits = Splits(splits.train.with_features(remedy.source(found, splits.train.features)),
                        splits.val.with_features(remedy.source(found, splits.val.features)),
                        splits.test.with_features(remedy.target(found.replay, splits.test.features)), splits.val_source)
        fitted.append(found)
        steps.append((found, None))
    return _recorded(PreparedInput(emb, splits, steps, fitted), settings)


def _recorded(prepared: PreparedInput, settings: dict) -> PreparedInput:
    if prepared.fitted:
        settings.setdefault("remedies", {})[prepared.embeddings.name] = {f.name: f.recorded()
                                                                              for f in prepared.fitted}
    return prepared


def _averaged_input(members: list[PreparedInput], config: CompareConfig, settings: dict) -> PreparedInput:
    """The input of ``--ensemble``'s rows: the members' features side by side, each block changed by its own
    member's features-stage remedies (as its heads saw it); a test row left unscored in any member is left out."""
    emb = averaged_input([m.embeddings for m in members])
    splits = _splits(emb, config)
    train, val, test = (split.features.copy() if split else None for split in (splits.train, splits.val, splits.test))
    ends = np.cumsum([m.embeddings.dim for m in members]).tolist()
    steps = []
    for member, begin, end in zip(members, [0] + ends[:-1], ends):
        for found, _ in member.steps:
            remedy = get_remedy(found.name)
            train[:, begin:end] = remedy.source(found, train[:, begin:end])
            val[:, begin:end] = remedy.source(found, val[:, begin:end])
            test[:, begin:end] = remedy.target(found.replay, test[:, begin:end])
            steps.append((found, (begin, end)))
    splits = Splits(splits.train.with_features(train), splits.val.with_features(val),
                    splits.test.with_features(test) if splits.test else None, splits.val_source)
    fitted = in_extraction(_recipes(emb))
    for name in dict.fromkeys(f.name for m in members for f, _ in m.steps):
        masks = [f.unscored for m in members for f, _ in m.steps if f.name == name and f.unscored is not None]
        unscored = np.logical_or.reduce(masks) if masks else None
        record = {"of_members": True, **({"test_rows": int(unscored.sum())} if unscored is not None else {})}
        fitted.append(Fitted(name, record=record, unscored=unscored, summary="as fitted on each file it averages"))
    return _recorded(PreparedInput(emb, splits, steps, fitted), settings)


def _one_thread(score, *args, **kwargs) -> HeadOutcome:
    with threadpool_limits(limits=1):
        return score(*args, **kwargs)


def _fit_and_score(name: str, splits: Splits, *, cv, seed, params) -> HeadOutcome:
    """One head on one input: tune and fit, then its validation and test probabilities (a task on a cluster)."""
    fitted = fit_head(name, splits.train.features, splits.train.labels, splits.val.features, splits.val.labels, cv=cv,
                      seed=seed, params=params)
    p_val = fitted.pipeline.predict_proba(splits.val.features)
    if splits.test is None:
        return HeadOutcome(fitted, p_val, None, None)
    began = time.perf_counter()
    p_test = fitted.pipeline.predict_proba(splits.test.features)
    return HeadOutcome(fitted, p_val, p_test, round(time.perf_counter() - began, 3))


def _averaged(name: str, outcomes: list[HeadOutcome], members: list[PreparedInput]) -> HeadOutcome:
    """One head fitted on each member file, as one head: their probabilities averaged in logit space
    (``heads.AveragedHeads``); every file scored the same images (``averaged_input`` checked)."""
    ends = np.cumsum([m.embeddings.dim for m in members]).tolist()
    fitted = [outcome.fitted for outcome in outcomes]
    head = FittedHead(
        name=name, pipeline=AveragedHeads([f.pipeline for f in fitted], list(zip([0] + ends[:-1], ends))),
        best_params={m.embeddings.label: f.best_params for m, f in zip(members, fitted)},
        tuning_score=float(np.mean([f.tuning_score for f in fitted])), tuned_on=fitted[0].tuned_on,
        note=f"the {name} head of each of {len(members)} files, averaged in logit space",
        fit_seconds=sum(f.fit_seconds for f in fitted))
    p_val = average_in_logit_space([outcome.val_proba for outcome in outcomes])
    if outcomes[0].test_proba is None:
        return HeadOutcome(head, p_val, None, None)
    return HeadOutcome(head, p_val, average_in_logit_space([outcome.test_proba for outcome in outcomes]),
                       sum(outcome.predict_s for outcome in outcomes))


def _score(prepared: PreparedInput, name: str, outcome: HeadOutcome, config: CompareConfig) -> HeadResult:
    """The leaderboard row and the scores of one head: the scores-stage remedies fitted on its probabilities
    (those that spread validation's before its threshold is chosen), then val and test scored."""
    emb, splits, options = prepared.embeddings, prepared.splits, config.options()
    context = Context(emb.name, emb.classes, options, config.seed, splits)
    scores = Scores(outcome.val_proba, splits.val.labels, splits.val.features, outcome.test_proba,
                    splits.test.features if splits.test else None)
    asked, fitted = requested(options, "scores"), []
    for remedy, value in (a for a in asked if a[0].before_threshold):
        scores = _apply(remedy, value, scores, context, fitted)
    binary = config.threshold and scores.val.shape[1] == 2
    chosen = choose_threshold(scores.val_labels, scores.val[:, 1], config.threshold) if binary else None
    scores = replace(scores, threshold=chosen, test_threshold=chosen)
    for remedy, value in (a for a in asked if not a[0].before_threshold):
        scores = _apply(remedy, value, scores, context, fitted)
    head = outcome.fitted
    row = {"file": emb.name, "backbone": emb.label, "cache_key": emb.cache_key, "head": name,
           "params": head.best_params, "tuned_on": head.tuned_on, "val_source": splits.val_source,
           "note": head.note, "threshold": chosen, "fit_s": round(head.fit_seconds, 2)}
    if fitted:
        row["remedies"] = {f.name: f.recorded() for f in fitted}
    unreplayable = [f.name for f in prepared.fitted + fitted if not get_remedy(f.name).replayable]
    if unreplayable:
        row["not_reproducible_by_predict"] = ", ".join(dict.fromkeys(unreplayable))
    said = predict_labels(scores.val, chosen)
    if len(np.unique(said)) == 1 and len(np.unique(splits.val.labels)) > 1:
        row["warning"] = (f"predicts {emb.classes[said[0]]} for every validation image: {len(splits.train)} training "
                          "rows taught it nothing")
        log.warning("%s × %s: %s", emb.label, name, row["warning"])
    result = HeadResult(row, emb.classes, head, emb,
                        classification_metrics(splits.val.labels, scores.val, emb.classes, threshold=chosen),
                        splits.val.labels, scores.val, threshold=chosen, test_threshold=scores.test_threshold,
                        remedies=saved_steps(prepared.steps, fitted))
    if scores.test is not None:
        row["predict_s"] = outcome.predict_s
        truth, proba, paths = splits.test.labels, scores.test, splits.test.paths
        unscored = prepared.unscored
        if unscored is not None:
            with_all = classification_metrics(truth, proba, emb.classes, threshold=scores.test_threshold)
            for found in (f for f in prepared.fitted if f.unscored is not None):
                get_remedy(found.name).scored_without(found, row, with_all)
            truth, proba, paths = truth[~unscored], proba[~unscored], paths[~unscored]
        result.test = classification_metrics(truth, proba, emb.classes, threshold=scores.test_threshold,
                                             with_ci=True, seed=config.seed)
        result.test_truth, result.test_proba, result.test_paths = truth, proba, paths
    for split_name, found in (("val", result.val), ("test", result.test)):
        for metric in REPORTED_METRICS:
            if found is not None and metric in found:
                row[f"{split_name}_{metric}"] = found[metric]
    return result


def _apply(remedy, value, scores: Scores, context: Context, fitted: list[Fitted]) -> Scores:
    """A scores-stage remedy fitted on one head's scores; the test images' changed by the replay predict uses."""
    found = remedy.fit_scores(value, scores, context)
    fitted.append(found)
    test, test_threshold = scores.test, scores.test_threshold
    if test is not None:
        test, test_threshold = remedy.replay_scores(found.replay, scores.test_features, test, test_threshold)
    return replace(scores, val=remedy.on_validation(found, scores), test=test, test_threshold=test_threshold)


OPEN_SET_SAMPLE = 20_000  # training rows brought into memory for the open-set calibration of an out-of-core run


def _compare_out_of_core(files: list[Embeddings], names: list[str], config: CompareConfig,
                         settings: dict) -> Leaderboard:
    """The lightgbm head trained on the cluster over each file's training rows, read where the tasks run."""
    from featx.heads.outofcore import fit_lightgbm

    address = cluster_address(config.cluster)
    if not address:
        raise ConfigError("--out-of-core needs --cluster: the workers train LightGBM together")
    if names != ["lightgbm"] or config.cv:
        others = ", ".join(n for n in names if n != "lightgbm") or "--cv"
        raise DataError(f"{others} keep every training row in memory and cannot train out of core; compare them "
                        "with --max-train-rows N (a stratified sample), or use --heads lightgbm alone")
    results, splits_of = [], {}
    with connect(address) as client:
        log.info(describe(client))
        for emb in files:
            labels = emb.labels_at()
            train, val, test, val_source = split_rows(emb, config.val_fraction, config.seed, check_features=False)
            train = np.sort(train)  # read block by block in file order

            def split(rows) -> Split:
                return Split(emb.features_at(rows), labels[rows], emb.paths[rows])

            sample = train[subsample_train(labels[train], OPEN_SET_SAMPLE, config.seed)]
            splits = Splits(split(sample), split(val), split(test) if test is not None else None, val_source)
            fitted = fit_lightgbm(client, emb, train, splits.val.features, splits.val.labels, config.seed)
            p_val = fitted.pipeline.predict_proba(splits.val.features)
            began = time.perf_counter()
            p_test = fitted.pipeline.predict_proba(splits.test.features) if splits.test else None
            outcome = HeadOutcome(fitted, p_val, p_test, round(time.perf_counter() - began, 3))
            prepared = _recorded(PreparedInput(emb, splits, [], in_extraction(_recipes(emb))), settings)
            results.append(_score(prepared, "lightgbm", outcome, config))
            splits_of[emb.name] = splits
    return Leaderboard([r.row for r in results], config.sort_by, results, files, splits_of,
                       settings).sorted(config.sort_by)


def _run_jobs(jobs: list[tuple[str, Splits]], config: CompareConfig) -> list[HeadOutcome]:
    """``_fit_and_score`` for every (head, splits) job: here one by one, or as parallel tasks on a Dask cluster
    through joblib's Dask backend. Either way the outcomes come back in the jobs' order.

    Here, as on a cluster's workers, BLAS and OpenMP run one thread: the same sums to the last bit, so the
    same leaderboard either way (lightgbm's bins, cut from PCA features, moved with the thread count); on a
    2-core Intel Xeon the flowers5 comparison also took 17.4 s instead of 20.7 s.
    """
    score = functools.partial(_fit_and_score, cv=config.cv, seed=config.seed)
    params = config.head_params
    address = cluster_address(config.cluster)
    import joblib

    if not address:
        workers = min(len(jobs), os.cpu_count() or 1)
        if workers > 1 and max(len(s.train) * s.train.features.shape[1] for _, s in jobs) >= PARALLEL_MIN_VALUES:
            # Each head in a process of its own, one BLAS thread each as here: the same leaderboard, the cores kept
            # busy (logreg's lbfgs uses one) instead of idle.
            return joblib.Parallel(n_jobs=workers)(
                joblib.delayed(_one_thread)(score, name, splits, params=params.get(name)) for name, splits in jobs)
        with threadpool_limits(limits=1):
            return [score(name, splits, params=params.get(name)) for name, splits in jobs]

    with connect(address) as client, joblib.parallel_backend("dask"):
        log.info(describe(client))
        return joblib.Parallel(n_jobs=-1)(joblib.delayed(score)(name, splits, params=params.get(name))
                                          for name, splits in jobs)
