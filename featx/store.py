"""The HDF5 embedding file (schema ``featx.embeddings/1``): writing, resuming, reading, the cache layout.

A file is written as ``NAME.h5.partial`` and renamed to ``NAME.h5`` only when every row
is in; ``rows_done`` is flushed after each batch so that a killed run resumes where it
stopped. Readers refuse unknown schemas and incomplete files. This module never
imports torch, so the CPU-only head path stays fast to start.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from featx.errors import DataError, SchemaError

SCHEMA = "featx.embeddings/1"
DATASETS = ("features", "labels", "paths", "split", "ok", "errors")
REQUIRED_ATTRS = ("schema", "backbone", "classes", "cache_key", "rows_done", "complete")
PARTIAL_SUFFIX = ".partial"
# Split name of the rows that hold augmented copies of train images (``featx extract --augment K``).
AUGMENTED = "augmented"
_STR = h5py.string_dtype("utf-8")
log = logging.getLogger(__name__)


def cache_key(recipe: dict) -> str:
    """Short hash of everything that changes the numbers (dataset, backbone, weights, preprocessing, …)."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]


def cache_path(cache_dir: str | Path, dataset_name: str, backbone: str, key: str) -> Path:
    """``cache/<dataset>/<backbone>-<key>.h5`` with characters unsafe in file names replaced."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in backbone)
    return Path(cache_dir) / dataset_name / f"{safe}-{key}.h5"


def package_version(module: str) -> str:
    """``module.__version__`` for provenance ('' when not installed); keeps build tags such as torch's ``+cu130``."""
    import importlib

    try:
        return importlib.import_module(module).__version__
    except ImportError:
        return ""


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class CacheLock:
    """An exclusive lock beside the output file, so two extractions never write one key at once.

    ``flock`` is released by the kernel when the process dies, so a killed run leaves no stale lock.
    """

    def __init__(self, path: Path):
        self.path = path.with_name(path.name + ".lock")
        self._handle = None

    def __enter__(self) -> "CacheLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "a+")
        try:
            fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # The holder unlinks the lock file when done; a lock won on that unlinked file is no lock.
            if os.fstat(self._handle.fileno()).st_ino != os.stat(self.path).st_ino:
                raise BlockingIOError
        except (BlockingIOError, FileNotFoundError):
            self._handle.close()
            raise DataError(
                f"{self.path.with_suffix('')}: another featx process is writing this file; wait for it to finish"
            ) from None
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self._handle, fcntl.LOCK_UN)
        self._handle.close()
        self.path.unlink(missing_ok=True)


class EmbeddingWriter:
    """Writes rows of one embedding file in order, resuming a matching ``.partial`` file.

    ``paths``, ``labels`` and ``split`` are known up front and written at creation;
    features arrive batch by batch through ``write``.
    """

    def __init__(self, path: Path, *, dim: int, paths, labels, splits, attrs: dict, dtype: str = "float16"):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        self.n_rows = len(paths)
        self._file = self._open_existing(attrs["cache_key"], dim) if self.partial.exists() else None
        if self._file is None:
            self._file = self._create(dim, paths, labels, splits, attrs, dtype)
        self.rows_done = int(self._file.attrs["rows_done"])
        self.label = attrs.get("label") or attrs["backbone"]

    def _open_existing(self, key: str, dim: int):
        try:
            handle = h5py.File(self.partial, "r+")
        except OSError as err:
            log.warning("%s: unreadable partial file (%s); starting over", self.partial, err)
            self.partial.unlink()
            return None
        same = (
            handle.attrs.get("schema") == SCHEMA
            and handle.attrs.get("cache_key") == key
            and handle["features"].shape == (self.n_rows, dim)
        )
        if not same:
            handle.close()
            log.warning("%s: left by a different configuration; starting over", self.partial)
            self.partial.unlink()
            return None
        log.info("resuming %s at row %d of %d", self.partial, handle.attrs["rows_done"], self.n_rows)
        return handle

    def _create(self, dim, paths, labels, splits, attrs, dtype):
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        handle = h5py.File(self.partial, "w")
        chunk_rows = max(1, min(self.n_rows, 256))
        handle.create_dataset(
            "features", shape=(self.n_rows, dim), dtype=dtype, chunks=(chunk_rows, dim),
            compression="gzip", compression_opts=1, shuffle=True,
        )
        handle.create_dataset("labels", data=np.asarray(labels, dtype=np.int32))
        handle.create_dataset("paths", data=list(paths), dtype=_STR)
        handle.create_dataset("split", data=list(splits), dtype=_STR)
        handle.create_dataset("ok", shape=(self.n_rows,), dtype=bool, fillvalue=False)
        handle.create_dataset("errors", shape=(self.n_rows,), dtype=_STR, fillvalue="")
        handle.attrs.update({k: _attr_value(v) for k, v in attrs.items()})
        handle.attrs["schema"] = SCHEMA
        handle.attrs["dtype"] = dtype
        handle.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        handle.attrs["rows_done"] = 0
        handle.attrs["complete"] = False
        handle.flush()
        return handle

    def write(self, features: np.ndarray, ok: np.ndarray, errors: list[str]) -> None:
        """Append the next rows and flush, so a crash after this call loses nothing before it."""
        start, stop = self.rows_done, self.rows_done + len(features)
        self._file["features"][start:stop] = features
        self._file["ok"][start:stop] = ok
        if any(errors):
            self._file["errors"][start:stop] = errors
        self._file.attrs["rows_done"] = stop
        self._file.flush()
        self.rows_done = stop

    def failures(self) -> list[tuple[int, str]]:
        """(row, reason) of every unreadable image written so far."""
        ok = self._file["ok"][: self.rows_done]
        errors = self._file["errors"].asstr()[: self.rows_done]
        return [(int(i), errors[i]) for i in np.flatnonzero(~ok)]

    def finish(self, extra_attrs: dict | None = None) -> Path:
        """Mark complete and move the file to its final name atomically."""
        if self.rows_done != self.n_rows:
            raise RuntimeError(f"finish() after {self.rows_done} of {self.n_rows} rows")
        self._file.attrs.update({k: _attr_value(v) for k, v in (extra_attrs or {}).items()})
        self._file.attrs["complete"] = True
        self._file.close()
        os.replace(self.partial, self.path)
        return self.path

    def close(self) -> None:
        if self._file.id.valid:
            self._file.close()


def _attr_value(value):
    """HDF5 attributes hold scalars and strings; lists and dicts are stored as JSON."""
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    if value is None:
        return ""
    if isinstance(value, str):
        return str(value)  # plain str: h5py refuses str subclasses such as torch's version string
    return value


def _decode(value):
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def read_meta(path: str | Path) -> dict:
    """The root attributes of an embedding file, checked for schema; works on partial files too."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    try:
        # No HDF5 file lock: `featx ls` and `info` must read a file another process is still writing.
        handle = h5py.File(path, "r", locking=False)
    except OSError:
        raise SchemaError(f"{path}: not an HDF5 file") from None
    with handle:
        meta = {k: _decode(v) for k, v in handle.attrs.items()}
        meta["n_rows"], meta["dim"] = handle["features"].shape if "features" in handle else (0, 0)
        missing_sets = [d for d in DATASETS if d not in handle]
    schema = meta.get("schema")
    if schema is None:
        raise SchemaError(f"{path}: not a featx embeddings file (no 'schema' attribute; expected {SCHEMA!r})")
    if schema != SCHEMA:
        raise SchemaError(f"{path}: unknown schema {schema!r}; this featx reads {SCHEMA!r}")
    missing = missing_sets + [a for a in REQUIRED_ATTRS if a not in meta]
    if missing:
        raise SchemaError(f"{path}: schema mismatch for {SCHEMA!r}: missing {', '.join(missing)}")
    return meta


@dataclass
class Embeddings:
    """One embedding file loaded in memory: features, labels, paths and splits, in file order."""

    path: Path
    meta: dict
    classes: list[str]
    paths: np.ndarray
    splits: np.ndarray
    ok: np.ndarray
    errors: np.ndarray
    _features: np.ndarray
    _labels: np.ndarray

    def rows(self, split: str | None = None) -> np.ndarray:
        """Indices of the readable rows of ``split`` (every image once when None: no augmented copies)."""
        mask = self.ok.copy()
        if split is None:
            mask &= self.splits != AUGMENTED
        else:
            if split not in set(self.splits.tolist()):
                present = sorted(set(self.splits.tolist()) - {""})
                raise DataError(f"{self.path}: no rows in split {split!r}; splits present: {present}")
            mask &= self.splits == split
        return np.flatnonzero(mask)

    def features(self, split: str | None = None) -> np.ndarray:
        """float32 features of the readable rows of ``split``."""
        return self._features[self.rows(split)].astype(np.float32)

    def labels(self, split: str | None = None) -> np.ndarray:
        return self._labels[self.rows(split)]

    def paths_of(self, split: str | None = None) -> np.ndarray:
        return self.paths[self.rows(split)]

    def augmented_copies(self, of_paths) -> tuple[np.ndarray, np.ndarray]:
        """Features and labels of the augmented copies of the images ``of_paths`` (none: empty arrays).

        Taking copies by source path keeps a validation image's copies out of training.
        """
        rows = self.rows(AUGMENTED) if self.n_copies else np.zeros(0, dtype=int)
        rows = rows[np.isin(self.paths[rows], np.asarray(of_paths))]
        return self._features[rows].astype(np.float32), self._labels[rows]

    @property
    def backbone(self) -> str:
        return self.meta["backbone"]

    @property
    def label(self) -> str:
        """The backbone as shown in leaderboards: ``efficientnet_lite0``, or ``…+ft-<hash>`` when fine-tuned."""
        return self.meta.get("label") or self.backbone

    @property
    def cache_key(self) -> str:
        return self.meta["cache_key"]

    @property
    def n_copies(self) -> int:
        """How many rows are augmented copies of train images (``extract --augment``)."""
        return int((self.splits == AUGMENTED).sum())

    @property
    def split_names(self) -> list[str]:
        return [s for s in ("train", "val", "test") if s in set(self.splits.tolist())]

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}={len(self.rows(s))}" for s in self.split_names)
        return (
            f"Embeddings({self.path.name}: {self.backbone}, {len(self)} rows × {self._features.shape[1]}, "
            f"{len(self.classes)} classes; {counts})"
        )


def load_embeddings(path: str | Path) -> Embeddings:
    """Read a complete ``featx.embeddings/1`` file; refuses other schemas and unfinished files."""
    path = Path(path)
    if path.name.endswith(PARTIAL_SUFFIX) and not path.exists():
        raise DataError(f"{path}: no such file")
    meta = read_meta(path)
    if not meta["complete"]:
        raise SchemaError(
            f"{path} is incomplete (rows_done={meta['rows_done']} of {meta['n_rows']}); "
            "run `featx extract` again to resume"
        )
    with h5py.File(path, "r") as handle:
        return Embeddings(
            path=path,
            meta=meta,
            classes=list(meta["classes"]),
            paths=handle["paths"].asstr()[:],
            splits=handle["split"].asstr()[:],
            ok=handle["ok"][:],
            errors=handle["errors"].asstr()[:],
            _features=handle["features"][:],
            _labels=handle["labels"][:],
        )


def concat_embeddings(parts: list[Embeddings]) -> Embeddings:
    """Several backbones' embeddings of the same images, side by side in one feature matrix.

    Rows must match one for one (same paths, splits and classes); a row is readable only if it
    was readable for every part.
    """
    first = parts[0]
    for other in parts[1:]:
        if other.paths.tolist() != first.paths.tolist() or other.splits.tolist() != first.splits.tolist():
            raise DataError(f"{other.path}: rows differ from {first.path} (other images or splits); "
                            "extract both from the same data with the same split")
        if other.classes != first.classes:
            raise DataError(f"{other.path}: classes {other.classes} differ from {first.classes}")
    label = "+".join(p.label for p in parts)
    meta = {**first.meta, "backbone": label, "label": label, "cache_key": "+".join(p.cache_key for p in parts),
            "parts": [str(p.path) for p in parts]}
    return Embeddings(
        path=Path("+".join(p.path.stem for p in parts) + ".h5"), meta=meta, classes=first.classes,
        paths=first.paths, splits=first.splits, ok=np.logical_and.reduce([p.ok for p in parts]),
        errors=first.errors, _features=np.concatenate([p._features.astype(np.float32) for p in parts], axis=1),
        _labels=first._labels,
    )


def list_cache(cache_dir: str | Path) -> list[dict]:
    """One summary per embedding file (complete or partial) under ``cache_dir``."""
    entries = []
    for path in sorted(Path(cache_dir).rglob("*.h5*")):
        if not (path.name.endswith(".h5") or path.name.endswith(".h5" + PARTIAL_SUFFIX)):
            continue
        entry = {"path": str(path), "size_mb": path.stat().st_size / 1e6}
        try:
            meta = read_meta(path)
        except DataError as err:
            entry["problem"] = str(err)
        else:
            entry.update(
                dataset=Path(meta.get("dataset_root", "")).name or path.parent.name,
                backbone=meta["backbone"],
                rows=meta["n_rows"],
                dim=meta["dim"],
                rows_done=meta["rows_done"],
                complete=bool(meta["complete"]),
            )
        entries.append(entry)
    return entries
