"""The rows nearest a query by cosine similarity: exact by default, an HNSW graph (faiss) for large files.

Exact search is one matrix product with the unit vectors, kept normalised (scikit-learn's brute-force cosine
``NearestNeighbors`` normalises the whole file again at every query: 15× slower at 60,000 rows of 1,280
dimensions, 14 ms a query; docs/results/similar.md). ``faiss`` (extra ``[similar]``) builds a graph once (16 s
at 60,000 rows) and answers in under a millisecond, at the price of sometimes missing a true neighbour: its
recall against the exact answer is measured by ``scripts/bench_similar.py``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from featx.errors import ConfigError
from featx.vocab import check

HNSW_LINKS = 32  # graph edges per node: faiss's usual choice for a few hundred to a few thousand dimensions
HNSW_SEARCH = 128  # candidates kept while searching: recall against exact search, for a little more time


@dataclass(frozen=True)
class Neighbour:
    """One image near the query: its row in the file, path, class name (empty where unlabelled), split and cosine
    similarity to the query."""

    row: int
    path: str
    label: str
    split: str
    similarity: float


def unit_rows(X: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1, so that dot products are cosines (a zero row stays zero)."""
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


class NeighbourIndex:
    """An index over ``features`` (one row each) answering ``query(vectors, k)`` with (rows, cosine similarities),
    nearest first."""

    def __init__(self, features: np.ndarray, index: str = "exact"):
        check("NeighbourIndex", index=index)
        self.index, self.size = index, len(features)
        vectors = unit_rows(np.asarray(features, dtype=np.float32))
        if index == "exact":
            self._search = vectors
        else:
            faiss = _import_faiss()
            self._search = faiss.IndexHNSWFlat(vectors.shape[1], HNSW_LINKS, faiss.METRIC_INNER_PRODUCT)
            self._search.hnsw.efSearch = HNSW_SEARCH
            self._search.add(np.ascontiguousarray(vectors))

    def query(self, vectors: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(rows, similarities), each ``(len(vectors), min(k, size))``, nearest first."""
        vectors = unit_rows(np.atleast_2d(np.asarray(vectors, dtype=np.float32)))
        k = min(k, self.size)
        if self.index == "exact":
            similarities = vectors @ self._search.T
            rows = np.argpartition(-similarities, k - 1, axis=1)[:, :k]
            picked = np.take_along_axis(similarities, rows, axis=1)
            order = np.lexsort((rows, -picked), axis=1)  # nearest first; ties by row, as brute force sorts them
            return np.take_along_axis(rows, order, axis=1), np.take_along_axis(picked, order, axis=1)
        similarities, rows = self._search.search(np.ascontiguousarray(vectors), k)
        return rows, similarities


def _import_faiss():
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which CPU build it loads is not the user's news
    try:
        import faiss
    except ImportError:
        raise ConfigError("the faiss index needs faiss-cpu: pip install 'featx[similar]'") from None
    return faiss
