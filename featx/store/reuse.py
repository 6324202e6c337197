"""Rows of earlier embedding files reused by content, so that a dataset that grows is embedded only where it changed.

A file made by the same recipe (backbone, weights, preprocessing, layer, precision, copies, views...) from another
version of the dataset holds, for every image it shares with the new version, the very row an extraction would
write: features are one function of the image (``feature_model.embed``), and an augmented copy is seeded by its
image's content and index, not by its position. Rows are matched by the ``content`` column (``sha256:<hex>``,
``#k`` for copy k), never by path: a renamed image is reused, an image edited in place is embedded again.
No torch here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np

from featx.errors import DataError
from featx.store.embeddings import CHUNK_ROWS, CONTENT, check_intact, read_meta
from featx.store.memo import remembered_of_file

log = logging.getLogger(__name__)
DATA_KEYS = ("dataset_fingerprint",)  # what a recipe says of the images alone; the rest says how they are embedded


def same_recipe_but_data(a: dict | None, b: dict | None) -> bool:
    """Whether two recipes embed images the same way (they may differ in which images)."""
    if not a or not b:
        return False
    return ({k: v for k, v in a.items() if k not in DATA_KEYS} == {k: v for k, v in b.items() if k not in DATA_KEYS})


def earlier_files(path: Path, recipe: dict, cache_dir: str | Path | None = None) -> list[Path]:
    """Complete files made by ``recipe`` from other images: beside ``path`` (its dataset's cache folder) first,
    then in the other folders of ``cache_dir`` (a renamed or copied dataset, ``ImageEmbedder``'s files), newest
    first within each."""
    folders = [path.parent]
    if cache_dir is not None and Path(cache_dir).is_dir():
        folders += sorted(f for f in Path(cache_dir).iterdir() if f.is_dir() and f != path.parent)
    found = []
    for rank, folder in enumerate(folders):
        for candidate in folder.glob("*.h5"):
            if candidate == path:
                continue
            try:
                meta = read_meta(candidate)
            except DataError:
                continue
            if meta["complete"] and same_recipe_but_data(meta.get("recipe"), recipe):
                found.append((-rank, candidate.stat().st_mtime, candidate))
    return [candidate for *_, candidate in sorted(found, reverse=True)]


class ReusableRows:
    """The rows of ``files`` by content identity (the first file holding one wins), read back in any order."""

    def __init__(self, files: list[Path]):
        self.files, self.where, self._open = [], {}, {}
        for path in files:
            try:
                remembered_of_file("intact", path, lambda: check_intact(path) and "verified")
                with h5py.File(path, "r", locking=False) as handle:
                    if CONTENT not in handle:
                        continue  # made before featx recorded content: nothing to match its rows by
                    contents = handle[CONTENT].asstr()[()]
            except (DataError, OSError) as err:
                log.warning("%s: not reused (%s)", path, err)
                continue
            index = len(self.files)
            self.files.append(path)
            for row, content in enumerate(contents):
                if content.startswith("sha256:"):  # an unreadable file's or a URL's identity is no content hash
                    self.where.setdefault(content, (index, row))

    def __contains__(self, content: str) -> bool:
        return content in self.where

    def dim(self) -> int:
        return int(self._handle(0)["features"].shape[1])

    def _handle(self, index: int) -> h5py.File:
        if index not in self._open:
            self._open[index] = h5py.File(self.files[index], "r", locking=False)
        return self._open[index]

    def close(self) -> None:
        for handle in self._open.values():
            handle.close()
        self._open.clear()

    def read(self, contents: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Features, ok and errors of the rows holding ``contents``, in that order."""
        places = [self.where[c] for c in contents]
        features = ok = None
        errors = [""] * len(contents)
        for index in range(len(self.files)):
            wanted = [(k, row) for k, (i, row) in enumerate(places) if i == index]
            if not wanted:
                continue
            rows, back = np.unique([row for _, row in wanted], return_inverse=True)
            handle = self._handle(index)
            if rows[-1] - rows[0] < 4 * len(rows) + CHUNK_ROWS:
                # rows close together (a grown dataset keeps its order): one contiguous read, each chunk decoded once
                span = slice(int(rows[0]), int(rows[-1]) + 1)
                block, block_ok = handle["features"][span][rows - span.start], handle["ok"][span][rows - span.start]
                block_errors = handle["errors"].asstr()[span][rows - span.start]
            else:  # scattered: only the chunks that hold them
                block, block_ok, block_errors = handle["features"][rows], handle["ok"][rows], handle["errors"].asstr()[rows]
            if features is None:
                features = np.empty((len(contents), block.shape[1]), dtype=block.dtype)
                ok = np.empty(len(contents), dtype=bool)
            for (k, _), j in zip(wanted, back):
                features[k], ok[k], errors[k] = block[j], block_ok[j], block_errors[j]
        return features, ok, errors
