"""Keeping a cache folder to what is still used: files superseded by a newer one of the same dataset and recipe,
stale ``.partial`` files, orphan shards and memo entries of files that are gone.

A file is never removed while a run folder refers to it: ``featx compare --out`` registers each run in the cache
folders of its inputs (``.runs/``), and the run's ``run.json`` names the files it used. No torch here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py

from featx.errors import DataError
from featx.store.embeddings import PARTIAL_SUFFIX, CacheLock, LockBusy, read_meta
from featx.store.memo import forget, stale_entries
from featx.store.reuse import DATA_KEYS

log = logging.getLogger(__name__)
RUNS = ".runs"  # in a cache folder: one small JSON per run folder that used files of it
CACHED_NAME = re.compile(r"-[0-9a-f]{10}\.h5$")  # store.embeddings.cache_path's names


@dataclass(frozen=True)
class Removal:
    path: Path
    size: int
    why: str


@dataclass
class PrunePlan:
    """What ``prune`` removes (``removals``), what it keeps although superseded (``kept``: path, why), and the
    memo entries it forgets."""

    removals: list[Removal]
    kept: list[tuple[Path, str]]
    memo: list[str]

    @property
    def size(self) -> int:
        return sum(r.size for r in self.removals)


def register_run(run: Path, files: list[Path]) -> None:
    """Record in each file's cache folder that the run folder ``run`` uses it (``prune`` keeps it while it does).
    Only files named as the cache names them (``<backbone>-<key>.h5``): a file kept elsewhere (a test fixture,
    a colleague's copy) gets nothing written beside it."""
    run = Path(run).resolve()
    by_folder: dict[Path, list[str]] = {}
    for path in files:
        path = Path(path).resolve()
        if CACHED_NAME.search(path.name) and path.exists():
            by_folder.setdefault(path.parent, []).append(str(path))
    for folder, used in by_folder.items():
        record = folder / RUNS / f"{hashlib.sha256(str(run).encode()).hexdigest()[:16]}.json"
        try:
            record.parent.mkdir(exist_ok=True)
            record.write_text(json.dumps({"run": str(run), "files": used}) + "\n")
        except OSError as err:  # a read-only cache still serves; prune then cannot see this run
            log.warning("%s: cannot record that %s uses it (%s)", folder, run, err.strerror)


def superseded(cache_dir: str | Path) -> dict[Path, Path]:
    """Each complete file made by the same recipe from the same dataset folder as a newer complete file, with that
    newer file (images added, removed or edited since)."""
    return _superseded(_complete(Path(cache_dir)))


def _complete(cache_dir: Path) -> dict[str, list[tuple[tuple, Path, dict]]]:
    """The complete files under ``cache_dir`` that record their recipe, by dataset folder and recipe, oldest first:
    (age, path, meta) each, read once."""
    groups: dict[str, list[tuple[tuple, Path, dict]]] = {}
    for path, meta in _files(cache_dir):
        if meta["complete"] and meta.get("recipe"):
            groups.setdefault(_group(meta), []).append((_age(path, meta), path, meta))
    for members in groups.values():
        members.sort(key=lambda member: member[0])
    return groups


def _superseded(groups: dict) -> dict[Path, Path]:
    return {path: members[-1][1] for members in groups.values() for _, path, _ in members[:-1]}


def plan_prune(cache_dir: str | Path, runs: list[Path] = ()) -> PrunePlan:
    """What ``featx prune`` would remove under ``cache_dir``; ``runs``: more run folders (or folders holding them)
    whose files to keep, for runs saved before featx registered them."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise DataError(f"{cache_dir}: no such folder")
    used = _used_keys(cache_dir, runs)
    removals, kept = [], []
    groups = _complete(cache_dir)
    newer, newest = _superseded(groups), {group: members[-1][0] for group, members in groups.items()}
    metas = {path: meta for members in groups.values() for _, path, meta in members}
    for path, by in sorted(newer.items()):
        key = metas[path]["cache_key"]
        if key in used:
            kept.append((path, f"superseded by {by.name}, but {used[key]} uses it"))
        else:
            shards = path.with_name(path.stem + ".shards")
            removals.append(Removal(path, _size(path) + (_size(shards) if shards.is_dir() else 0),
                                    f"superseded by {by.name} (same recipe, other images)"))
    for path, meta in _files(cache_dir, partial=True):
        why = _stale_partial(path, meta, newest)
        if why and not _busy(path):
            removals.append(Removal(path, _size(path), why))
    removals += _orphan_shards(cache_dir, newer, newest)
    removals += [Removal(p, _size(p), "records a run folder that is gone") for p in _stale_records(cache_dir)]
    return PrunePlan(removals, kept, stale_entries())


def prune(plan: PrunePlan) -> None:
    """Remove what ``plan`` lists (a superseded file's shards with it), then forget the memo entries of files that
    are gone or changed (the removed files' too)."""
    for removal in plan.removals:
        shards = removal.path.with_name(removal.path.stem + ".shards")
        if removal.path.is_dir():
            shutil.rmtree(removal.path, ignore_errors=True)
        else:
            removal.path.unlink(missing_ok=True)
            if removal.path.suffix == ".h5" and shards.is_dir():
                shutil.rmtree(shards, ignore_errors=True)
    forget(stale_entries())


def _files(cache_dir: Path, partial: bool = False):
    """(path, meta) of the complete embedding files (or of the ``.partial`` ones) under ``cache_dir``, shards
    left out."""
    suffix = ".h5" + PARTIAL_SUFFIX if partial else ".h5"
    for path in sorted(cache_dir.rglob("*" + suffix)):
        if any(part.endswith(".shards") for part in path.parent.parts):
            continue
        try:
            yield path, read_meta(path)
        except DataError:
            continue


def _age(path: Path, meta: dict) -> tuple:
    """When a file was begun (recorded to the second), then last written: later is newer."""
    return str(meta.get("created", "")), path.stat().st_mtime_ns


def _group(meta: dict) -> str:
    recipe = {k: v for k, v in meta["recipe"].items() if k not in DATA_KEYS}
    return json.dumps([meta.get("dataset_root"), recipe], sort_keys=True)


def _stale_partial(path: Path, meta: dict, newest: dict[str, tuple]) -> str:
    final = path.with_name(path.name[:-len(PARTIAL_SUFFIX)])
    if final.exists():
        return f"left over: {final.name} is complete"
    latest = newest.get(_group(meta)) if meta.get("recipe") else None
    if latest is not None and latest > _age(path, meta):
        return "an unfinished extraction of images a newer complete file supersedes"
    return ""  # the latest attempt: the same command resumes it


def _busy(path: Path) -> bool:
    final = path.with_name(path.name[:-len(PARTIAL_SUFFIX)])
    try:
        with CacheLock(final):
            return False
    except LockBusy:
        return True


def _orphan_shards(cache_dir: Path, newer: dict[Path, Path], newest: dict[str, tuple]) -> list[Removal]:
    """Shards no published file reads: all of a consolidated file's, or those of an extraction superseded before
    it was published."""
    found = []
    for folder in sorted(p for p in cache_dir.rglob("*.shards") if p.is_dir()):
        published = folder.with_name(folder.name[:-len(".shards")] + ".h5")
        if published in newer:
            continue  # removed with the file it belongs to
        used = set()
        if published.exists():
            with h5py.File(published, "r", locking=False) as handle:
                if handle["features"].is_virtual:
                    used = {os.path.normpath(published.parent / s[1]) for s in handle["features"].virtual_sources()}
        elif not _shards_superseded(folder, newest):
            continue  # an unfinished cluster extraction: the same command goes on from its shards
        state = "is one contiguous file" if published.exists() else "was superseded before it was published"
        found += [Removal(shard, _size(shard), f"a shard no file reads ({published.name} {state})")
                  for shard in sorted(folder.glob("*.h5")) if os.path.normpath(shard) not in used]
    return found


def _shards_superseded(folder: Path, newest: dict[str, tuple]) -> bool:
    """Whether a complete file of the same group, newer than these unpublished shards, exists."""
    shards = sorted(folder.glob("*.h5"))
    if not shards:
        return False
    try:
        meta = read_meta(shards[0])
    except DataError:
        return False
    if not meta.get("recipe"):
        return False
    return newest.get(_group(meta), ()) > _age(shards[0], meta)


def _used_keys(cache_dir: Path, runs) -> dict[str, str]:
    """The cache keys of every file a run folder uses, with that run: the runs registered in ``cache_dir``, and
    those under ``runs``. (Keys, not paths: run.json may name its inputs relative to where compare ran.)"""
    folders = {Path(json.loads(p.read_text())["run"]) for p in cache_dir.rglob(f"{RUNS}/*.json") if _readable(p)}
    for given in map(Path, runs):
        folders |= {p.parent for p in given.rglob("run.json")}
    used = {}
    for run in folders:
        try:
            info = json.loads((run / "run.json").read_text())
        except (OSError, ValueError):
            continue
        for entry in info.get("inputs", []):
            for key in str(entry.get("cache_key", "")).split("+"):  # joined inputs name every part's key
                used[key] = str(run)
    return used


def _stale_records(cache_dir: Path) -> list[Path]:
    return [p for p in sorted(cache_dir.rglob(f"{RUNS}/*.json"))
            if not _readable(p) or not (Path(json.loads(p.read_text())["run"]) / "run.json").exists()]


def _readable(record: Path) -> bool:
    try:
        return isinstance(json.loads(record.read_text()).get("run"), str)
    except (OSError, ValueError, AttributeError):
        return False


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0
