"""`featx doctor`: check a file or folder featx made, and say what is wrong and what to do about it.

An embedding file: schema, column lengths and checksums, every chunk, NaN rows, progress. A run
folder: run.json and the leaderboard, every head (loaded the safe way), the plots, ``best/`` and its
open-set calibration, and whether the embeddings it was made from changed since. A fine-tuned
checkpoint: its sidecar and a weights-only load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from featx.errors import DataError
from featx.heads.registry import load_head
from featx.store.memo import file_sha256
from featx.heads.openset import OpenSet
from featx.comparison.runs import RUN_FILE, best_head, half_written, load_run
from featx.store.embeddings import PARTIAL_SUFFIX, verify_file


@dataclass
class Diagnosis:
    path: Path
    kind: str  # "embeddings", "run", or "checkpoint"
    checked: list[str] = field(default_factory=list)  # what was looked at and found sound
    problems: list[str] = field(default_factory=list)  # each says what is wrong and what to do

    @property
    def healthy(self) -> bool:
        return not self.problems


def diagnose(path: str | Path) -> Diagnosis:
    """Everything wrong with ``path`` (an embedding file, a run folder, a checkpoint); empty problems when sound."""
    path = Path(path)
    if path.is_dir() and (path / RUN_FILE).exists():
        found = _run(path)
        found.problems += half_written(path)
        return found
    if path.is_dir() and half_written(path):  # a run whose save was cut short
        return Diagnosis(path, "run", [], half_written(path))
    if path.suffix == ".pt":
        return _checkpoint(path)
    if path.name.endswith((".h5", ".h5" + PARTIAL_SUFFIX)):
        problems = verify_file(path)
        return Diagnosis(path, "embeddings", [] if problems else ["schema, column checksums, every chunk, no NaN rows"],
                         problems)
    raise DataError(f"{path}: not something featx made (an embedding .h5, a run folder with {RUN_FILE}, or a .pt "
                    "checkpoint)")


def _run(folder: Path) -> Diagnosis:
    found = Diagnosis(folder, "run")
    try:
        run = load_run(folder)
    except DataError as err:
        found.problems.append(str(err))
        return found
    found.checked.append(f"{RUN_FILE} and leaderboard.json ({len(run.rows)} rows)")
    heads = [folder / r["model"] for r in run.info.get("results", []) if r.get("model")]
    for path in heads:
        try:
            load_head(path)
        except DataError as err:
            found.problems.append(str(err))
    found.checked.append(f"{len(heads)} heads load without running code")
    missing = [name for name in run.info.get("plots", []) if not (folder / name).exists()]
    if missing:
        found.problems.append(f"{folder}: {len(missing)} plots missing (e.g. {missing[0]}); re-run `featx compare "
                              "--out` to make them again")
    try:
        best = best_head(folder)
        load_head(best)
        OpenSet.load(best.parent)
        found.checked.append("best/ head and open-set calibration")
    except DataError as err:
        found.problems.append(str(err))
    for item in run.info.get("inputs", []):
        source = Path(item["path"])
        if item.get("sha256") and source.exists() and file_sha256(source) != item["sha256"]:
            found.problems.append(f"{source}: changed since this run was made (its SHA-256 differs); re-run "
                                  "`featx compare --out` on it")
    return found


def _checkpoint(path: Path) -> Diagnosis:
    from featx.embed.checkpoints import read_checkpoint

    try:
        sidecar, state = read_checkpoint(path)
    except DataError as err:
        return Diagnosis(path, "checkpoint", [], [str(err)])
    return Diagnosis(path, "checkpoint", [f"sidecar ({sidecar['backbone']}, classes {sidecar['classes']}) and "
                                          f"{len(state)} backbone tensors, loaded weights-only"])
