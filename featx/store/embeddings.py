"""The HDF5 embedding file (schema ``featx.embeddings/1``): writing, resuming, verifying, reading, the cache layout.

A file is written as ``NAME.h5.partial`` and renamed to ``NAME.h5`` only when every row is in.
``rows_done`` advances only after a batch is flushed, with the batch's checksum beside it, and
only while the disk has room for it; a resumed run verifies what was written and rolls back to
the last good chunk instead of trusting the counter. Numeric columns carry HDF5's Fletcher32
checksum per chunk, the others a SHA-256 in the attributes, so readers notice damage and say so
in one line. Readers refuse unknown schemas and incomplete files. This module never imports
torch, so the CPU-only head path stays fast to start.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import h5py
import numpy as np

from featx.errors import ConfigError, DataError, FeatxError, SchemaError
from featx.notebook import definition_list, html_table
from featx.store.neighbours import Neighbour, NeighbourIndex
from featx.vocab import check

SCHEMA = "featx.embeddings/1"
DATASETS = ("features", "labels", "paths", "split", "ok", "errors")
REQUIRED_ATTRS = ("schema", "backbone", "classes", "cache_key", "rows_done", "complete")
PARTIAL_SUFFIX = ".partial"
# Split name of the rows that hold augmented copies of train images (``featx extract --augment K``).
AUGMENTED = "augmented"
SPLIT_ORDER = ("train", "val", "test", AUGMENTED)
CHUNK_ROWS = 256  # rows per HDF5 chunk of every checksummed column: the unit of damage and of roll-back
CONTENT = "content"  # each row's content identity (``featx.store.reuse``); files before featx 0.6 have none
SUMMED_COLUMNS = ("labels", "paths", "split", "ok", "errors", CONTENT)  # SHA-256 each in the "checksums" attribute
SHARD_PLAN = "plan.json"  # in a shards folder: the row ranges its extraction chose (featx.embed.shards)
# What a file records about its own writing, not about its rows: never carried into another file.
WRITING_ATTRS = {"schema", "created", "rows_done", "complete", "checksums", "last_batch", "dtype", "n_rows", "dim",
                 "shards"}
SPACE_MARGIN = 16 * 2**20  # bytes kept free beyond the data: HDF5 metadata and chunk rewrites
_STR = h5py.string_dtype("utf-8")
log = logging.getLogger(__name__)


def damaged(path: Path, reason: str) -> DataError:
    """The one message for a file whose contents no longer verify."""
    return DataError(f"{path}: damaged file ({reason}); re-extract with `featx extract … --force`")


def check_space(folder: Path, needed: int) -> None:
    """Refuse to write ``needed`` bytes into ``folder`` unless the disk has them (and a margin) free."""
    free = shutil.disk_usage(folder).free
    if free < needed + SPACE_MARGIN:
        raise FeatxError(f"disk full: {(needed + SPACE_MARGIN) / 2**20:.0f} MB needed, {free / 2**20:.0f} MB free at "
                         f"{folder}; free some space and run the same command again to resume")


def _first_line(err: Exception) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0][:200]


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


class LockBusy(DataError):
    """Another featx process holds the lock."""


class CacheLock:
    """An exclusive lock beside the output file, so two extractions never write one key at once.

    ``flock`` is released by the kernel when the process dies, so a killed run leaves no stale lock.
    """

    def __init__(self, path: Path):
        self.path = path.with_name(path.name + ".lock")
        self._handle = None

    def __enter__(self) -> "CacheLock":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path, "a+")
        except OSError as err:
            raise DataError(f"{self.path.parent}: cannot write here ({err.strerror}); choose another --out") from None
        try:
            fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # The holder unlinks the lock file when done; a lock won on that unlinked file is no lock.
            if os.fstat(self._handle.fileno()).st_ino != os.stat(self.path).st_ino:
                raise BlockingIOError
        except (BlockingIOError, FileNotFoundError):
            self._handle.close()
            raise LockBusy(
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
    features arrive batch by batch through ``write``. Paths are stored as their file-system
    bytes, so a name that is not valid UTF-8 survives the round trip (readers decode it with
    surrogate escapes, as ``os.fsdecode`` does).
    """

    def __init__(self, path: Path, *, dim: int, paths, labels, splits, attrs: dict, dtype: str = "float16",
                 contents=None):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        self.n_rows = len(paths)
        self.row_bytes = dim * np.dtype(dtype).itemsize
        self._file = self._open_existing(attrs["cache_key"], dim) if self.partial.exists() else None
        if self._file is None:
            self._file = self._create(dim, paths, labels, splits, attrs, dtype, contents)
        self.rows_done = int(self._file.attrs["rows_done"])
        self.label = attrs.get("label") or attrs["backbone"]

    def _open_existing(self, key: str, dim: int):
        try:
            handle = h5py.File(self.partial, "r+")
            same = (handle.attrs.get("schema") == SCHEMA and handle.attrs.get("cache_key") == key
                    and handle["features"].shape == (self.n_rows, dim))
        except (OSError, KeyError) as err:
            log.warning("%s: unreadable partial file (%s); starting over", self.partial, _first_line(err))
            self.partial.unlink()
            return None
        if not same:
            handle.close()
            log.warning("%s: left by a different configuration; starting over", self.partial)
            self.partial.unlink()
            return None
        done = int(handle.attrs["rows_done"])
        good = verified_rows(handle)
        if good < done:
            log.warning("%s: rows %d-%d do not verify (a crash or a full disk damaged them); resuming at row %d",
                        self.partial, good, done, good)
            stop = min(good + CHUNK_ROWS, self.n_rows)  # a whole chunk in one write replaces a damaged one unread
            handle["features"][good:stop] = 0
            handle["ok"][good:stop] = False
            handle.attrs["rows_done"] = good
            handle.flush()
        log.info("resuming %s at row %d of %d", self.partial, good, self.n_rows)
        return handle

    def _create(self, dim, paths, labels, splits, attrs, dtype, contents):
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        encoded = [os.fsencode(p) for p in paths]
        check_space(self.partial.parent, self.n_rows * self.row_bytes + sum(map(len, encoded)) * 2)
        handle = h5py.File(self.partial, "w")
        create_columns(handle, self.n_rows, dim, dtype, encoded, labels, splits, contents)
        handle.attrs.update({k: _attr_value(v) for k, v in attrs.items()})
        handle.attrs["schema"] = SCHEMA
        handle.attrs["dtype"] = dtype
        handle.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        handle.attrs["rows_done"] = 0
        handle.attrs["complete"] = False
        handle.flush()
        return handle

    def write(self, features: np.ndarray, ok: np.ndarray, errors: list[str]) -> None:
        """Append the next rows, flush, and only then advance ``rows_done`` (with the batch's checksum).

        A crash or a full disk at any point leaves ``rows_done`` on rows that were written whole.
        """
        start, stop = self.rows_done, self.rows_done + len(features)
        check_space(self.partial.parent, 2 * len(features) * self.row_bytes)
        try:
            self._file["features"][start:stop] = features
            self._file["ok"][start:stop] = ok
            if any(errors):
                self._file["errors"][start:stop] = errors
            self._file.flush()
            self._file.attrs["last_batch"] = json.dumps([start, stop, _rows_digest(self._file, start, stop)])
            self._file.attrs["rows_done"] = stop
            self._file.flush()
        except OSError as err:
            raise FeatxError(f"{self.partial}: writing rows {start}-{stop} failed ({_first_line(err)}); run the "
                             "same command again to resume") from None
        self.rows_done = stop

    def failures(self) -> list[tuple[int, str]]:
        """(row, reason) of every unreadable image written so far."""
        ok = self._file["ok"][: self.rows_done]
        errors = self._file["errors"].asstr()[: self.rows_done]
        return [(int(i), errors[i]) for i in np.flatnonzero(~ok)]

    def finish(self, extra_attrs: dict | None = None) -> Path:
        """Record the columns' checksums, mark complete and move the file to its final name atomically."""
        if self.rows_done != self.n_rows:
            raise RuntimeError(f"finish() after {self.rows_done} of {self.n_rows} rows")
        self._file.attrs.update({k: _attr_value(v) for k, v in (extra_attrs or {}).items()})
        self._file.attrs["checksums"] = json.dumps(column_checksums(self._file))
        self._file.attrs["complete"] = True
        self._file.close()
        os.replace(self.partial, self.path)
        return self.path

    def close(self) -> None:
        try:
            if self._file.id.valid:
                self._file.close()
        except OSError as err:  # closing after a failed write: the error that matters was raised already
            log.debug("%s: close failed (%s)", self.partial, err)


def create_columns(handle: h5py.File, n_rows: int, dim: int, dtype: str, paths, labels, splits,
                   contents=None) -> None:
    """The columns of a ``featx.embeddings/1`` file: features, ok and errors to fill, the rest given (``content``
    where the rows' content identities are known)."""
    chunk_rows = max(1, min(n_rows, CHUNK_ROWS))
    handle.create_dataset("features", shape=(n_rows, dim), dtype=dtype, chunks=(chunk_rows, dim),
                          compression="gzip", compression_opts=1, shuffle=True, fletcher32=True)
    handle.create_dataset("labels", data=np.asarray(labels, dtype=np.int32), chunks=(chunk_rows,), fletcher32=True)
    handle.create_dataset("paths", data=list(paths), dtype=_STR)
    handle.create_dataset("split", data=list(splits), dtype=_STR)
    handle.create_dataset("ok", shape=(n_rows,), dtype=bool, fillvalue=False, chunks=(chunk_rows,), fletcher32=True)
    handle.create_dataset("errors", shape=(n_rows,), dtype=_STR, fillvalue="")
    if contents is not None:
        handle.create_dataset(CONTENT, data=[c.replace("\0", " ") for c in contents], dtype=_STR)


def _rows_digest(handle: h5py.File, start: int, stop: int) -> str:
    """SHA-256 of rows ``start:stop`` as written: features, ok and errors."""
    digest = hashlib.sha256(handle["features"][start:stop].tobytes())
    digest.update(handle["ok"][start:stop].tobytes())
    digest.update("\0".join(handle["errors"].asstr()[start:stop]).encode())
    return digest.hexdigest()


def verified_rows(handle: h5py.File, on_chunk=None) -> int:
    """How many of the ``rows_done`` rows verify: every chunk reads (Fletcher32) and the last batch's checksum holds.

    Damage rolls back to the start of the chunk it is in: rows before it were written, flushed and
    checked when their own batches were. ``on_chunk`` sees each chunk's features as they are read.
    """
    done = int(handle.attrs["rows_done"])
    for begin in range(0, done, CHUNK_ROWS):
        try:
            features = handle["features"][begin:min(begin + CHUNK_ROWS, done)]
            handle["ok"][begin:min(begin + CHUNK_ROWS, done)]
        except OSError:
            return begin
        if on_chunk is not None:
            on_chunk(features)
    last = json.loads(handle.attrs.get("last_batch", "null"))
    if last and last[1] == done and _rows_digest(handle, last[0], last[1]) != last[2]:
        return last[0] - last[0] % CHUNK_ROWS
    return done


def read_failures(path: Path) -> list[tuple[int, str, str]]:
    """(row, path, reason) of every unreadable image in a file, without reading its features."""
    with h5py.File(path, "r", locking=False) as handle:
        rows = np.flatnonzero(~handle["ok"][()])
        paths = handle["paths"].asstr(errors="surrogateescape")[()]
        errors = handle["errors"].asstr()[()]
    return [(int(i), paths[i], errors[i]) for i in rows]


def column_checksums(handle: h5py.File) -> dict[str, str]:
    """SHA-256 of each small column (the features have Fletcher32 per chunk instead)."""
    sums = {}
    for name in (n for n in SUMMED_COLUMNS if n in handle):
        column = handle[name]
        data = column[()] if column.dtype.kind != "O" else b"\0".join(column[()])
        sums[name] = hashlib.sha256(data.tobytes() if isinstance(data, np.ndarray) else data).hexdigest()
    return sums


def _attr_value(value):
    """HDF5 attributes hold scalars and strings; lists and dicts are stored as JSON."""
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    if value is None:
        return ""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a folder name that is not UTF-8: its file-system bytes, read back alike
            return os.fsencode(value)
        return str(value)  # plain str: h5py refuses str subclasses such as torch's version string
    return value


def _decode(value):
    if isinstance(value, bytes):
        value = value.decode("utf-8", "surrogateescape")
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
        lengths = {d: len(handle[d]) for d in DATASETS if d in handle}
    schema = meta.get("schema")
    if schema is None:
        raise SchemaError(f"{path}: not a featx embeddings file (no 'schema' attribute; expected {SCHEMA!r})")
    if schema != SCHEMA:
        raise SchemaError(f"{path}: unknown schema {schema!r}; this featx reads {SCHEMA!r}")
    missing = missing_sets + [a for a in REQUIRED_ATTRS if a not in meta]
    if missing:
        raise SchemaError(f"{path}: schema mismatch for {SCHEMA!r}: missing {', '.join(missing)}")
    if len(set(lengths.values())) > 1:
        raise damaged(path, "columns of different lengths: " + ", ".join(f"{d} {n}" for d, n in lengths.items()))
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
    contents: np.ndarray | None = None  # each row's content identity (``featx.store.reuse``), where recorded

    def rows(self, split: str | None = None) -> np.ndarray:
        """Indices of the readable rows of ``split`` (every image once when None: no augmented copies)."""
        rows = self.rows_of(split)
        kept = self.ok[rows] & (self.splits[rows] != AUGMENTED if split is None else True)
        return rows[kept]

    def features(self, split: str | None = None) -> np.ndarray:
        """float32 features of the readable rows of ``split``."""
        return self._features[self.rows(split)].astype(np.float32)

    def labels(self, split: str | None = None) -> np.ndarray:
        return self._labels[self.rows(split)]

    def paths_of(self, split: str | None = None) -> np.ndarray:
        return self.paths[self.rows(split)]

    def features_at(self, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        """float32 features of the file rows ``rows`` (indices into the file, augmented copies included; every
        row by default)."""
        return self._features[rows].astype(np.float32)

    def labels_at(self, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        """Labels of the file rows ``rows`` (-1 where unlabelled; every row by default)."""
        return self._labels[rows]

    def finite_rows(self) -> np.ndarray:
        """True for each row whose features hold no NaN or infinity (reads every feature)."""
        return np.isfinite(self._features).all(axis=1)

    def with_labels(self, labels: np.ndarray) -> "Embeddings":
        """The same rows with other labels, one per row: shuffled test labels show that a choice never read them."""
        if len(labels) != len(self):
            raise ValueError(f"{len(labels)} labels for {len(self)} rows")
        return replace(self, _labels=np.asarray(labels))

    def augmented_copies(self, of_paths) -> tuple[np.ndarray, np.ndarray]:
        """Features and labels of the augmented copies of the images ``of_paths`` (none: empty arrays).

        Taking copies by source path keeps a validation image's copies out of training.
        """
        rows = self.rows(AUGMENTED) if self.n_copies else np.zeros(0, dtype=int)
        rows = rows[np.isin(self.paths[rows], np.asarray(of_paths))]
        return self._features[rows].astype(np.float32), self._labels[rows]

    def without_copies(self) -> "Embeddings":
        """The rows of the images themselves: files of the same images with and without augmented copies (or
        with copies made another way) then match row for row."""
        if not self.n_copies:
            return self
        kept = self.splits != AUGMENTED
        return replace(self, paths=self.paths[kept], splits=self.splits[kept], ok=self.ok[kept],
                       errors=self.errors[kept], _features=self._features[kept], _labels=self._labels[kept],
                       contents=None if self.contents is None else self.contents[kept])

    def columns(self, rows: np.ndarray) -> dict[str, list]:
        """The columns of ``rows`` beside their features, as a table shows them: path, label (the class name, empty
        where unlabelled), label_index (-1 there), split, ok, error, content (empty where the file has none)."""
        labels = self._labels[rows]
        return {"path": self.paths[rows].tolist(), "label": [self.classes[i] if i >= 0 else "" for i in labels],
                "label_index": labels.tolist(), "split": self.splits[rows].tolist(), "ok": self.ok[rows].tolist(),
                "error": self.errors[rows].tolist(),
                "content": self.contents[rows].tolist() if self.contents is not None else [""] * len(rows)}

    def rows_of(self, split: str | None = None) -> np.ndarray:
        """Every row of ``split`` (of the file when None), readable or not, augmented copies included."""
        if split is None:
            return np.arange(len(self))
        if split not in set(self.splits.tolist()):
            present = sorted(set(self.splits.tolist()) - {""})
            raise DataError(f"{self.path}: no rows in split {split!r}; splits present: {present}")
        return np.flatnonzero(self.splits == split)

    def to_pandas(self, split: str | None = None):
        """A DataFrame of every row of ``split`` (of the file when None), indexed by file row: the ``columns`` and
        ``embedding`` (each row's float32 features). Unreadable rows and augmented copies are in it: select with
        ``df[df.ok]`` and ``split``, as ``features()`` does."""
        try:
            import pandas as pd
        except ImportError:
            raise ConfigError("Embeddings.to_pandas needs pandas: pip install 'featx[pandas]'") from None
        rows = self.rows_of(split)
        frame = pd.DataFrame(self.columns(rows), index=pd.Index(rows, name="row"))
        frame["embedding"] = list(self.features_at(rows))
        return frame

    def neighbours(self, query: int | np.ndarray, k: int = 10, split: str | None = None,
                   index: str = "exact") -> list[Neighbour]:
        """The ``k`` readable images of ``split`` (of the file, no augmented copies, when None) nearest ``query``
        by cosine, nearest first: ``query`` is a file row (which is left out of its own answer) or a feature
        vector (``featx similar`` embeds a new image with this file's recipe first)."""
        check("Embeddings.neighbours", k=k)
        rows = self.rows(split)
        if isinstance(query, (int, np.integer)):
            if not 0 <= query < len(self):
                raise DataError(f"{self.path}: no row {query}; rows are 0 to {len(self) - 1}")
            vector, rows = self.features_at([query]), rows[rows != query]
        else:
            vector = np.asarray(query, dtype=np.float32).reshape(1, -1)
            if vector.shape[1] != self.dim:
                raise DataError(f"{self.path}: a query of {vector.shape[1]} features; this file's have {self.dim}")
        if not len(rows):
            raise DataError(f"{self.path}: no readable rows to search" + (f" in split {split!r}" if split else ""))
        found, similarities = NeighbourIndex(self.features_at(rows), index).query(vector, k)
        nearest = rows[found[0][found[0] >= 0]]  # faiss marks missing answers -1
        columns = self.columns(nearest)
        return [Neighbour(int(row), path, label, split, float(s)) for row, path, label, split, s
                in zip(nearest, columns["path"], columns["label"], columns["split"], similarities[0])]

    @property
    def backbone(self) -> str:
        return self.meta["backbone"]

    @property
    def label(self) -> str:
        """The backbone as shown in leaderboards: ``efficientnet_lite0``, or ``…+ft-<hash>`` when fine-tuned."""
        return self.meta.get("label") or self.backbone

    @property
    def name(self) -> str:
        """The input's name in a leaderboard and a run folder: its file name, unless ``compare`` had two inputs of
        one file name (from different folders), which then carry their cache keys too."""
        return self.meta.get("name") or self.path.name

    @property
    def cache_key(self) -> str:
        return self.meta["cache_key"]

    @property
    def dim(self) -> int:
        """The feature size (of several backbones side by side, their sum)."""
        return int(self._features.shape[1])

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

    def _repr_html_(self) -> str:
        """Images per class and split (readable ones; augmented copies and unreadable rows counted apart) and
        how the file was made."""
        present = set(self.splits.tolist())
        splits = [s for s in SPLIT_ORDER if s in present] + sorted(present - set(SPLIT_ORDER))
        labels = self._labels
        names = [(i, c) for i, c in enumerate(self.classes)] + ([(-1, "(unlabelled)")] if (labels < 0).any() else [])
        rows = [[name] + [int((self.ok & (labels == i) & (self.splits == s)).sum()) for s in splits]
                for i, name in names]
        rows.append(["not readable"] + [int((~self.ok & (self.splits == s)).sum()) for s in splits])
        made = {"file": self.path, "backbone": self.label, "rows × features": f"{len(self)} × {self.dim}",
                **{k: self.meta[k] for k in ("weights", "precision", "dtype", "image_size", "created",
                                              "featx_version", "cache_key") if k in self.meta}}
        return (html_table(["class"] + [s or "(none)" for s in splits], rows, caption=f"{self.path.name}")
                + definition_list(made))


class LazyFeatures:
    """The features column of a file, read from disk only for the rows asked for (``lazy=True``)."""

    def __init__(self, path: Path, shape: tuple[int, int], dtype):
        self.path, self.shape, self.dtype = path, shape, np.dtype(dtype)

    def __getitem__(self, rows) -> np.ndarray:
        """The features of ``rows`` in the order asked (HDF5 reads distinct rows in increasing order only)."""
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        if not len(rows):
            return np.zeros((0, self.shape[1]), self.dtype)
        distinct, order = np.unique(rows, return_inverse=True)
        try:
            with h5py.File(self.path, "r", locking=False) as handle:
                return handle["features"][distinct][order]
        except OSError as err:
            raise damaged(self.path, _first_line(err)) from None


def load_embeddings(path: str | Path, lazy: bool = False) -> Embeddings:
    """Read a complete ``featx.embeddings/1`` file; refuses other schemas and unfinished files.

    ``lazy`` reads every column but the features, which are then read from disk row by row as asked
    (training on more rows than memory holds, see ``featx.heads.outofcore``).
    """
    path = Path(path)
    if path.name.endswith(PARTIAL_SUFFIX) and not path.exists():
        raise DataError(f"{path}: no such file")
    meta = read_meta(path)
    if not meta["complete"]:
        raise SchemaError(
            f"{path} is incomplete (rows_done={meta['rows_done']} of {meta['n_rows']}); "
            "run `featx extract` again to resume"
        )
    try:
        with h5py.File(path, "r") as handle:
            verify_checksums(handle, path)
            return Embeddings(
                path=path,
                meta=meta,
                classes=list(meta["classes"]),
                paths=handle["paths"].asstr(errors="surrogateescape")[:],
                splits=handle["split"].asstr()[:],
                ok=handle["ok"][:],
                errors=handle["errors"].asstr()[:],
                _features=LazyFeatures(path, handle["features"].shape, handle["features"].dtype) if lazy
                else handle["features"][:],
                _labels=handle["labels"][:],
                contents=handle[CONTENT].asstr()[:] if CONTENT in handle else None,
            )
    except OSError as err:  # Fletcher32 or a compressed chunk that no longer decodes
        raise damaged(path, _first_line(err)) from None


def verify_checksums(handle: h5py.File, path: Path) -> None:
    """Compare the small columns with the SHA-256s recorded at finish (files from before featx 0.2 have none)."""
    recorded = _decode(handle.attrs.get("checksums", "{}"))
    found = column_checksums(handle) if recorded else {}
    wrong = [name for name, digest in recorded.items() if found.get(name) != digest]
    if wrong:
        raise damaged(path, f"checksum mismatch in {', '.join(wrong)}")


def check_intact(path: str | Path, on_chunk=None) -> dict:
    """Raise ``damaged`` unless every written chunk reads (Fletcher32) and every column checksum holds; the meta.

    Reading every chunk costs one pass over the file (about 0.1 s for 5,840 × 1280 float16 rows).
    """
    path = Path(path)
    meta = read_meta(path)
    try:
        with h5py.File(path, "r", locking=False) as handle:
            verify_checksums(handle, path)
            good = verified_rows(handle, on_chunk)
    except OSError as err:
        raise damaged(path, _first_line(err)) from None
    if good < int(meta["rows_done"]):
        raise damaged(path, f"rows from {good} on do not verify")
    return meta


def verify_file(path: str | Path) -> list[str]:
    """Every problem of an embedding file, each with what to do, for `featx doctor`: empty when healthy."""
    counts = []
    try:  # one pass: the chunks read to verify them are counted for NaN rows on the way
        meta = check_intact(path, on_chunk=lambda rows: counts.append(int((~np.isfinite(rows)).any(axis=1).sum())))
    except DataError as err:
        return [str(err)]
    problems = []
    non_finite = sum(counts)
    if non_finite:
        problems.append(f"{path}: {non_finite} rows hold NaN or infinite features; re-extract them with "
                        "`featx extract … --force --precision fp32`")
    if not meta["complete"]:
        problems.append(f"{path}: incomplete (rows_done={meta['rows_done']} of {meta['n_rows']}); run "
                        "`featx extract` again to resume")
    return problems


JOINED_STEM_MAX = 120  # leaves room under a file name's 255 bytes for ".averaged", "__<head>_<split>" and a plot prefix


def joined_stem(stems: list[str]) -> str:
    """The name of several files side by side: every stem while that is short enough to name a run's files
    (eight cache files' stems are not), else the first stem, how many more, and a digest of them all."""
    stem = "+".join(stems)
    if len(stem.encode()) <= JOINED_STEM_MAX:
        return stem
    digest = hashlib.sha256(stem.encode()).hexdigest()[:10]
    return f"{stems[0].encode()[:64].decode(errors='ignore')}+{len(stems) - 1}-more-{digest}"


def _class_name(emb: Embeddings, row: int) -> str:
    label = int(emb._labels[row])
    return emb.classes[label] if label >= 0 else "unlabelled"


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
        differ = np.flatnonzero(other._labels != first._labels)
        if len(differ):
            row = differ[0]
            raise DataError(f"{other.path}: labels differ from {first.path} on {len(differ)} rows (e.g. "
                            f"{first.paths[row]}: {_class_name(other, row)} here, {_class_name(first, row)} there); "
                            "extract both from the same labelled data")
    label = "+".join(p.label for p in parts)
    name = joined_stem([Path(p.name).stem for p in parts]) + ".h5"
    meta = {**first.meta, "backbone": label, "label": label, "cache_key": "+".join(p.cache_key for p in parts),
            "name": name,
            "parts": [str(p.path) for p in parts],
            # how each part was made, so a head on the joined features can embed new images the same ways
            "part_meta": [{k: v for k, v in p.meta.items() if k not in ("shards", "part_meta")} for p in parts]}
    return Embeddings(
        path=Path(name), meta=meta, classes=first.classes,
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
                made_with=made_with(meta),
            )
            if not meta["complete"]:  # progress is worth showing only as far as it verifies
                entry["resumes_at"] = _resumes_at(path)
        entries.append(entry)
    return entries


def made_with(meta: dict) -> str:
    """What tells files of one backbone apart in a listing: input size and fit, copies, AdaBN, TTA, views,
    checkpoint."""
    config = meta.get("config") or {}
    parts = [f"{meta.get('image_size', '?')} px {meta.get('fit', 'crop')}"]  # recorded only when not crop
    if config.get("augment"):
        parts.append(f"{config['augment']} {config.get('aug', 'natural')} copies")
    parts += [name for name, used in (("AdaBN", config.get("adapt_bn")), ("TTA", meta.get("tta"))) if used]
    if config.get("tta_views"):
        parts.append(f"{config['tta_views']} {config.get('aug', 'natural')} views averaged")
    if config.get("checkpoint"):
        parts.append(f"from {config['checkpoint']}")
    return ", ".join(parts)


def rows_written(partial: Path) -> int:
    """``rows_done`` of a file being written, read alone (0 when it cannot be read): cheap enough to poll."""
    try:
        with h5py.File(partial, "r", locking=False) as handle:
            return int(handle.attrs["rows_done"])
    except (OSError, KeyError):
        return 0


def _resumes_at(partial: Path) -> int:
    """The row a re-run of an interrupted extraction starts from (0 when the file cannot be opened)."""
    try:
        with h5py.File(partial, "r", locking=False) as handle:
            return verified_rows(handle)
    except (OSError, KeyError):
        return 0


# --- sharded files: one virtual file over the shards, and back to one contiguous file ----------------------

def publish_shards(path: Path, shards: list[Path], n_rows: int, summary: list[dict]) -> Path:
    """``path`` as a ``featx.embeddings/1`` file whose columns are virtual datasets over ``shards``.

    The shards must be complete and their row ranges tile ``0..n_rows`` exactly: a gap would read as
    fill values without a word, so a missing, extra or overlapping shard is refused, naming it.
    Source paths are relative, so the file and its ``.shards`` folder move together.
    """
    metas = {shard: read_meta(shard) for shard in shards}
    unfinished = [shard.name for shard, meta in metas.items() if not meta["complete"]]
    if unfinished:
        raise DataError(f"{path}: shards not finished: {', '.join(unfinished)}; run the same command again")
    ranges = sorted((tuple(meta["shard_rows"]), shard) for shard, meta in metas.items())
    expected = 0
    for (start, stop), shard in ranges:
        if start != expected:
            what = "missing" if start > expected else "overlapping"
            raise DataError(f"{path}: cannot publish: rows {min(start, expected)}-{max(start, expected)} are {what} "
                            f"before {shard.name}; re-run the extraction to make the missing shards")
        expected = stop
    if expected != n_rows:
        raise DataError(f"{path}: cannot publish: the shards end at row {expected}, not {n_rows}; re-run the "
                        "extraction to make the missing shards")
    first = metas[ranges[0][1]]
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    with h5py.File(ranges[0][1], "r", locking=False) as sample:
        columns = {name: (sample[name].dtype, sample[name].shape[1:]) for name in (*DATASETS, CONTENT)
                   if name in sample}
    with h5py.File(partial, "w") as handle:
        for name, (dtype, tail) in columns.items():
            layout = h5py.VirtualLayout(shape=(n_rows, *tail), dtype=dtype)
            for (start, stop), shard in ranges:
                source = os.path.relpath(shard, path.parent)
                layout[start:stop] = h5py.VirtualSource(source, name, shape=(stop - start, *tail), dtype=dtype)
            handle.create_virtual_dataset(name, layout)
        attrs = {k: v for k, v in first.items() if k not in ("shard_rows", "n_rows", "dim", "last_batch", "checksums",
                                                            "extract_seconds", "failed")}
        handle.attrs.update({k: _attr_value(v) for k, v in attrs.items()})
        handle.attrs["cache_key"] = first["cache_key"].split("[")[0]  # a shard's key carries its rows
        handle.attrs["shards"] = json.dumps(summary)
        handle.attrs["failed"] = sum(int(meta.get("failed", 0)) for meta in metas.values())
        handle.attrs["rows_done"] = n_rows
    # HDF5 opens a virtual dataset's sources in the mode of the file read through: read-only, or every shard
    # would be opened for writing (and touched) just to checksum it.
    with h5py.File(partial, "r", locking=False) as handle:
        checksums = column_checksums(handle)
    with h5py.File(partial, "r+") as handle:
        handle.attrs["checksums"] = json.dumps(checksums)
        handle.attrs["complete"] = True
    os.replace(partial, path)
    return path


def consolidate(path: str | Path) -> Path:
    """Copy a published virtual file into one contiguous file at the same path, then remove its shards.

    Worth it for many shards or many reads: a full read through 1,000 shards was 7× slower than through
    the consolidated file (scripts/bench_cluster.py).
    """
    path = Path(path)
    meta = check_intact(path)
    with h5py.File(path, "r", locking=False) as source:
        if not source["features"].is_virtual:
            raise DataError(f"{path}: already one contiguous file")
        shard_files = {os.path.normpath(path.parent / s[1]) for s in source["features"].virtual_sources()}
        n_rows, dim = source["features"].shape
        check_space(path.parent, n_rows * dim * source["features"].dtype.itemsize * 2)
        merged = path.with_name(path.name + ".consolidating")
        with h5py.File(merged, "w") as target:
            create_columns(target, n_rows, dim, source["features"].dtype.name, source["paths"][()],
                           source["labels"][()], source["split"][()],
                           source[CONTENT].asstr()[()] if CONTENT in source else None)
            for start in range(0, n_rows, CHUNK_ROWS * 16):
                stop = min(start + CHUNK_ROWS * 16, n_rows)
                target["features"][start:stop] = source["features"][start:stop]
            target["ok"][:] = source["ok"][()]
            target["errors"][:] = source["errors"][()]
            target.attrs.update({k: v for k, v in source.attrs.items() if k != "checksums"})
            target.attrs["checksums"] = json.dumps(column_checksums(target))
    os.replace(merged, path)
    for shard in shard_files:
        Path(shard).unlink(missing_ok=True)
    folder = Path(next(iter(shard_files))).parent if shard_files else None
    if folder is not None and folder.is_dir():
        (folder / SHARD_PLAN).unlink(missing_ok=True)
        if not any(folder.iterdir()):
            folder.rmdir()
    log.info("consolidated %s (%d rows from %d shards)", path, meta["n_rows"], len(shard_files))
    return path
