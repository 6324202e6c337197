"""The run folder: every artifact's path and name, saving a compared leaderboard as a run, and loading one back.

What ``featx compare --out RUN`` writes (nothing else builds these paths)::

    RUN/run.json                               config, versions, inputs (path, sha256, cache key), every result
    RUN/leaderboard.{csv,md,json}              ranked by the validation metric
    RUN/heads/<file stem>__<head>.{json,npz}   every fitted head, as plain data (featx.heads.serialize)
    RUN/predictions/<stem>__<head>_<split>.csv per-image probabilities (test, else val)
    RUN/plots/{confusion,roc}_<stem>__<head>_<split>.png
    RUN/best/head.{json,npz}, open_set.{npz,json}, chosen.json   the best head by validation, for `featx predict`

A run is written into a hidden sibling (``.RUN.partial-*``) that takes RUN's place in one rename, under the lock
``RUN.lock`` (``save_run``). And what ``featx finetune --out FT`` writes beside its checkpoints (``featx.embed.checkpoints``)::

    FT/best.pt, best.json, last.pt, last.json, history.csv, history.png, lr_find.png, lr_find.json
"""

from __future__ import annotations

import csv
import html
import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featx.errors import DataError
from featx.comparison.leaderboard import Leaderboard, rows_html
from featx.heads.registry import save_head
from featx.store.memo import file_sha256
from featx.store.prune import register_run
from featx.heads.metrics import predict_labels
from featx.heads.openset import OpenSet
from featx.comparison.plots import confusion_figure, roc_figure, save
from featx.store.embeddings import CacheLock, LockBusy, package_version
from featx.notebook import inline_png
from featx.version import __version__

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
HEAD_FILE = "head.json"
LEGACY_HEAD_FILE = "head.joblib"  # run folders of featx before 0.2: a pickle, loaded only with --trust
SPLITS = ("val", "test")
FINETUNE_FILES = {"history_csv": "history.csv", "history_plot": "history.png", "lr_find_plot": "lr_find.png",
                  "lr_find_json": "lr_find.json"}
OWNED = ("run.json", "leaderboard.csv", "leaderboard.md", "leaderboard.json", "report.html", "heads", "predictions",
         "plots", "best")  # what a run folder holds of featx's: replaced whole when the folder is reused
VERSIONED = {"numpy": "numpy", "scikit-learn": "sklearn", "lightgbm": "lightgbm", "h5py": "h5py", "joblib": "joblib"}


# --- paths ------------------------------------------------------------------------------------------------

def result_stem(file_name: str, head: str) -> str:
    """``<embedding file stem>__<head>``: the name every artifact of one leaderboard row shares."""
    return f"{Path(file_name).stem}__{head}"


def head_path(run_dir: Path, file_name: str, head: str) -> Path:
    return Path(run_dir) / "heads" / f"{result_stem(file_name, head)}.json"


def head_files(run_dir: str | Path, head: str) -> list[Path]:
    """Every saved head of kind ``head`` in a run folder (older folders' joblib heads too), sorted."""
    folder = Path(run_dir) / "heads"
    return sorted([*folder.glob(f"*__{head}.json"), *folder.glob(f"*__{head}.joblib")])


def predictions_path(run_dir: Path, file_name: str, head: str, split: str) -> Path:
    return Path(run_dir) / "predictions" / f"{result_stem(file_name, head)}_{split}.csv"


def plot_path(run_dir: Path, kind: str, file_name: str, head: str, split: str) -> Path:
    return Path(run_dir) / "plots" / f"{kind}_{result_stem(file_name, head)}_{split}.png"


def map_path(run_dir: Path, file_name: str) -> Path:
    """The map of one input's images (``featx report`` draws it)."""
    return Path(run_dir) / "plots" / f"map_{Path(file_name).stem}.png"


def best_head(path: str | Path) -> Path:
    """The file of a run's best head: in ``RUN/best``, or in ``path`` itself when it holds one (a copy of ``best/``).

    A run folder without its run.json is refused: its save was cut short, and what is left of it (an earlier
    run's ``best/``, or half of the new one's) is not what any leaderboard measured.
    """
    path = Path(path)
    for folder in (path / "best", path):
        for name in (HEAD_FILE, LEGACY_HEAD_FILE):
            if (folder / name).exists():
                run = folder.parent if folder.name == "best" else None
                if run is not None and any((run / entry).exists() for entry in OWNED) and not (run / RUN_FILE).exists():
                    raise DataError(f"{run}: no {RUN_FILE}: a run whose saving was cut short; run `featx compare "
                                    "--out` again (`featx doctor` says what is left)")
                return folder / name
    raise DataError(f"{path}: no {HEAD_FILE}; point at a run folder written by `featx compare --out`")


def finetune_file(folder: str | Path, kind: str) -> Path:
    """One of a fine-tune run folder's files (``FINETUNE_FILES``)."""
    return Path(folder) / FINETUNE_FILES[kind]


def finetune_plots(checkpoint: str | Path) -> list[Path]:
    """The training curves and LR-finder plot beside a fine-tuned checkpoint, those that exist."""
    paths = (finetune_file(Path(checkpoint).parent, kind) for kind in ("history_plot", "lr_find_plot"))
    return [p for p in paths if p.exists()]


# --- saving -----------------------------------------------------------------------------------------------

STAGING, REPLACED = ".partial-", ".replaced-"  # siblings of RUN while it is written: .RUN.partial-*, .RUN.replaced-*
_HELD: set[Path] = set()  # run folders this process holds the lock of (``writing_run``)


def prepare_out(out: str | Path) -> Path:
    """Check that ``out`` can take a run, before any work is done: a new folder, or an earlier run's.

    A file, a folder of something else, or a folder featx cannot write to is refused in one line; a run whose
    saving was cut short is finished or undone first (``recover``).
    """
    out = _writable(out)
    recover(out)
    if out.is_dir() and not (out / RUN_FILE).exists() and any(p.name not in OWNED for p in out.iterdir()):
        raise DataError(f"{out}: not empty and not a featx run folder; choose another --out")
    return out


def _writable(out: str | Path) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; choose another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out.parent).close()
    except OSError as err:
        raise DataError(f"{out}: cannot write a run here ({err.strerror}); choose another --out") from None
    return out


@contextmanager
def writing_run(out: str | Path):
    """Hold ``out``'s lock (``out.lock`` beside it) while a run is computed and saved: a second featx writing the
    same folder is refused at once, in one line, instead of replacing the run or mixing two. The kernel drops the
    lock of a killed process."""
    out = _writable(out)
    key = out.resolve()
    if key in _HELD:
        yield prepare_out(out)
        return
    try:
        with CacheLock(out):
            _HELD.add(key)
            try:
                yield prepare_out(out)
            finally:
                _HELD.discard(key)
    except LockBusy:
        raise DataError(f"{out}: another featx process is writing this run; wait for it to finish or choose another "
                        "--out") from None


def save_run(board: Leaderboard, out: str | Path) -> Path:
    """Write ``board`` as the run folder ``out``; each row records where its head was saved (``model``).

    Written as the cache is: into a hidden sibling folder, which then takes ``out``'s place in one rename, so
    ``out`` is always the earlier run or the new one, whole; the earlier run's featx files go, anything else
    kept in the folder moves into the new one.
    """
    with writing_run(out) as out:
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}{STAGING}", dir=out.parent))
        try:
            _write_run(board, staging)
            _publish(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    register_run(out, [Path(p) for e in board.inputs for p in (e.meta.get("parts") or [e.path])])
    return out


def _publish(staging: Path, out: Path) -> None:
    """``staging`` becomes ``out``: the earlier run is moved aside first and its user files carried over after;
    a failure in between puts it back (and ``recover`` does, after a kill)."""
    aside = None
    if out.exists():
        aside = Path(tempfile.mkdtemp(prefix=f".{out.name}{REPLACED}", dir=out.parent))
        os.replace(out, aside / "run")
    try:
        os.replace(staging, out)
    except BaseException:
        if aside:
            os.replace(aside / "run", out)
            aside.rmdir()
        raise
    if aside:
        _carry_over(aside / "run", out)
        shutil.rmtree(aside)


def _carry_over(old: Path, new: Path) -> None:
    """Whatever a user kept in the earlier run's folder (not featx's own entries) moves into the new run."""
    for entry in old.iterdir():
        if entry.name not in OWNED and not (new / entry.name).exists():
            os.replace(entry, new / entry.name)


def recover(out: str | Path) -> list[str]:
    """Finish or undo a save of ``out`` that was cut short (a kill between the renames of ``_publish``): an earlier
    run moved aside comes back where no run took its place, or gives its user files to the one that did; hidden
    staging folders are removed. Says what it did, one line each. Call it only while holding ``writing_run``."""
    out, done = Path(out), []
    for aside in sorted(out.parent.glob(f".{out.name}{REPLACED}*")):
        if (aside / "run").is_dir() and not (out / RUN_FILE).exists():
            if out.exists():
                shutil.rmtree(out)
            os.replace(aside / "run", out)
            done.append(f"{out}: the earlier run, moved aside by a save that was cut short, is back")
        elif (aside / "run").is_dir():
            _carry_over(aside / "run", out)
        shutil.rmtree(aside, ignore_errors=True)
    for staging in sorted(out.parent.glob(f".{out.name}{STAGING}*")):
        shutil.rmtree(staging, ignore_errors=True)
        done.append(f"{staging}: a run being written when it was cut short; removed")
    for line in done:
        log.warning(line)
    return done


def half_written(out: str | Path) -> list[str]:
    """What is left of a save of ``out`` that was cut short (for ``featx doctor``): hidden siblings, or featx's
    entries in ``out`` without its run.json."""
    out = Path(out)
    found = [f"{p}: left by a save that was cut short; the next `featx compare --out {out}` finishes or removes it"
             for p in sorted(out.parent.glob(f".{out.name}{REPLACED}*")) + sorted(out.parent.glob(f".{out.name}{STAGING}*"))]
    if out.is_dir() and not (out / RUN_FILE).exists() and any(p.name in OWNED for p in out.iterdir()):
        found.append(f"{out}: holds featx's run files but no {RUN_FILE}: a run whose saving was cut short (written "
                     "in place by an older featx, or damaged); run `featx compare --out` again")
    return found


def _write_run(board: Leaderboard, out: Path) -> None:
    """Every file of the run into the empty folder ``out``, run.json last."""
    for result in board.results:
        row = result.row
        saved = save_head(head_path(out, row["file"], row["head"]), result.fitted, result.embeddings,
                          result.decision_threshold("test"), result.remedies, result.threshold)
        row["model"] = str(saved.relative_to(out))
    (out / "leaderboard.csv").write_text(board.to_csv())
    (out / "leaderboard.md").write_text(board.to_markdown() + "\n")
    (out / "leaderboard.json").write_text(board.to_json() + "\n")
    _save_predictions(out, board)
    _save_best(out, board)
    plots = _save_plots(out, board)
    run = {
        "featx_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": board.settings,
        "inputs": [{"path": str(e.path), "name": e.name, "sha256": file_sha256(e.path) if e.path.exists() else None,
                    "cache_key": e.cache_key, "backbone": e.label, "classes": e.classes,
                    **({"parts": e.meta["parts"]} if "parts" in e.meta else {})} for e in board.inputs],
        "versions": {name: package_version(module) for name, module in VERSIONED.items()},
        "results": [{**r.row, "val": r.val, "test": r.test} for r in board.results],
        "plots": plots,
    }
    (out / RUN_FILE).write_text(json.dumps(run, indent=2, default=_json_default) + "\n")


def _save_predictions(out: Path, board: Leaderboard) -> None:
    """Per-image test (or val) probabilities of every head, for error analysis and the report."""
    (out / "predictions").mkdir(parents=True, exist_ok=True)
    for result in board.results:
        row, classes = result.row, result.classes
        split = "test" if result.test_proba is not None else "val"
        proba, truth = (result.test_proba, result.test_truth) if split == "test" else (result.val_proba,
                                                                                        result.val_truth)
        paths = result.test_paths if split == "test" else None
        predicted = predict_labels(proba, result.decision_threshold(split))
        with open(predictions_path(out, row["file"], row["head"], split), "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "truth", "predicted"] + [f"p_{c}" for c in classes])
            for i in range(len(truth)):
                writer.writerow([paths[i] if paths is not None else "", classes[truth[i]], classes[predicted[i]]]
                                + [f"{p:.6f}" for p in proba[i]])


def _save_best(out: Path, board: Leaderboard) -> None:
    """``out/best/``: the best head by validation score, its open-set calibration, and why it was chosen."""
    best = board.best()
    splits = board.splits[best["file"]]
    open_set = OpenSet.calibrate(splits.train.features, splits.train.labels, splits.val.features,
                                 board.result_of(best).val_proba,
                                 seed=board.settings["seed"])
    folder = out / "best"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / best["model"], folder / HEAD_FILE)
    shutil.copyfile((out / best["model"]).with_suffix(".npz"), (folder / HEAD_FILE).with_suffix(".npz"))
    open_set.save(folder)
    (folder / "chosen.json").write_text(json.dumps({k: v for k, v in best.items() if k != "model"}, indent=2,
                                                   default=float) + "\n")


def _save_plots(out: Path, board: Leaderboard) -> list[str]:
    """Confusion matrices (val and test) and the ROC curve (test, else val) of every head; paths relative to out."""
    (out / "plots").mkdir(parents=True, exist_ok=True)
    written = []
    for result in board.results:
        row, classes = result.row, result.classes
        for split in SPLITS:
            truth, proba = (result.val_truth, result.val_proba) if split == "val" else (result.test_truth,
                                                                                       result.test_proba)
            if truth is None:
                continue
            title = f"{row['backbone']} + {row['head']} ({split}, n={len(truth)})"
            figure = confusion_figure(truth, predict_labels(proba, result.decision_threshold(split)), classes, title)
            written.append(save(figure, plot_path(out, "confusion", row["file"], row["head"], split)))
            if split == "test" or result.test_truth is None:
                written.append(save(roc_figure(truth, proba, classes, title),
                                    plot_path(out, "roc", row["file"], row["head"], split)))
    return [str(p.relative_to(out)) for p in written]


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


# --- loading ----------------------------------------------------------------------------------------------

@dataclass
class Run:
    """A run folder read back: ``info`` is run.json, ``rows`` the ranked leaderboard."""

    folder: Path
    info: dict
    rows: list[dict]

    def plots(self, file_name: str, head: str, split: str) -> list[Path]:
        """The confusion matrix and ROC curve of one row's ``split``, those that exist."""
        candidates = (plot_path(self.folder, kind, file_name, head, split) for kind in ("confusion", "roc"))
        return [p for p in candidates if p.exists()]

    def _repr_html_(self) -> str:
        """The leaderboard, best row marked, and the best head's confusion matrix (test, else val) inline."""
        best = self.rows[0]
        plots = [p for split in reversed(SPLITS) for p in self.plots(best["file"], best["head"], split)
                 if p.name.startswith("confusion")]
        sort_by = (self.info.get("config") or {}).get("sort_by", "balanced_accuracy")
        return (f"<p><b>{html.escape(str(self.folder))}</b></p>" + rows_html(self.rows, 0, sort_by)
                + (inline_png(plots[0]) if plots else ""))

    def predictions(self, file_name: str, head: str) -> tuple[Path, str] | None:
        """One row's per-image predictions file and its split (test, else val), if saved."""
        for split in reversed(SPLITS):
            path = predictions_path(self.folder, file_name, head, split)
            if path.exists():
                return path, split
        return None


def load_run(path: str | Path) -> Run:
    """A run folder written by ``save_run`` (``featx compare --out`` / ``featx train --out``)."""
    folder = Path(path)
    if not (folder / RUN_FILE).exists():
        raise DataError(f"{folder}: no {RUN_FILE}; point at a folder written by `featx compare --out` or "
                        "`featx train --out`")
    info, rows = (read_json(folder / name, "re-run `featx compare --out`") for name in (RUN_FILE, "leaderboard.json"))
    if not isinstance(info, dict) or not isinstance(rows, list) or not rows:
        raise DataError(f"{folder}: {RUN_FILE} or leaderboard.json does not hold a featx run; re-run "
                        "`featx compare --out`")
    return Run(folder, info, rows)


def read_json(path: Path, remedy: str):
    """A JSON file of a run folder, or one line naming it, what is wrong, and ``remedy``."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: missing; {remedy}") from None
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not readable JSON ({err}); {remedy}") from None
