"""A map of a dataset: its embeddings in two dimensions, coloured by class, shaped by split, with the images an
analyst should look at marked — likely label errors among train, and the test images least like any train image.

t-SNE (scikit-learn) after PCA to 50 dimensions, or UMAP where ``umap-learn`` is installed; both seeded, so the
same file gives the same picture. Beyond ``max_points`` images a seeded sample is drawn (the marked ones always
in it): t-SNE's cost grows faster than the rows.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featx.comparison.plots import map_figure, save
from featx.errors import ConfigError, DataError
from featx.shift.audit import LabelIssue, checked_labels
from featx.store.embeddings import Embeddings
from featx.store.neighbours import NeighbourIndex
from featx.vocab import check

MAX_POINTS = 2000  # t-SNE of 2,000 points of 50 dimensions: about 12 s on 2 cores
MARKED = 12  # images marked of each kind


@dataclass(frozen=True)
class DatasetMap:
    """Two coordinates for each of ``rows`` (file rows), and which rows are marked and why."""

    file: Path
    method: str
    seed: int
    total: int  # readable images of the file, before any sampling
    rows: np.ndarray
    xy: np.ndarray
    classes: list[str]  # each row's class name ("" where unlabelled)
    splits: list[str]
    label_errors: list[int]  # file rows whose label is likely wrong (train)
    least_like_train: list[int]  # test rows whose nearest train image is farthest
    note: str = ""

    def figure(self):
        """The map as a matplotlib Figure."""
        where = {row: i for i, row in enumerate(self.rows.tolist())}
        return map_figure(self.xy, self.classes, self.splits, [where[r] for r in self.label_errors],
                          [where[r] for r in self.least_like_train],
                          f"{self.file.name}: {self.method} of {len(self.rows)} of {self.total} images, seed "
                          f"{self.seed}" + (f"\n{self.note}" if self.note else ""))

    def save(self, path: str | Path) -> Path:
        """The map as a PNG at ``path``."""
        return save(self.figure(), Path(path))


def dataset_map(emb: Embeddings, method: str = "auto", max_points: int = MAX_POINTS, seed: int = 0,
                marked: int = MARKED, checked: tuple[list[LabelIssue], str] | None = None) -> DatasetMap:
    """The map of ``emb``'s readable images (augmented copies left out); ``checked``: its label check
    (``audit.checked_labels``) where the caller made it already."""
    check("dataset_map", map_method=method, max_points=max_points, seed=seed)
    method = resolve_method(method)
    readable = emb.rows()
    if len(readable) < 5:
        raise DataError(f"{emb.path}: {len(readable)} readable images; a map needs at least 5")
    issues, note = checked if checked is not None else checked_labels(emb, seed)
    errors = [issue.row for issue in issues[:marked]]
    unlike = _least_like_train(emb, marked)
    rows = _sample(readable, set(errors) | set(unlike), max_points, seed)
    xy = _layout(emb.features_at(rows), method, seed)
    columns = emb.columns(rows)
    return DatasetMap(emb.path, method, seed, len(readable), rows, xy, columns["label"], columns["split"], errors,
                      unlike, note)


def resolve_method(method: str) -> str:
    """``auto``: UMAP where umap-learn is installed, else t-SNE."""
    spec = importlib.util.find_spec("umap") if method != "tsne" else None
    installed = spec is not None and spec.origin is not None  # not a namespace left behind by an uninstall
    if method == "umap" and not installed:
        raise ConfigError("--method umap needs umap-learn: pip install 'featx[map]' (or use --method tsne)")
    return ("umap" if installed else "tsne") if method == "auto" else method


def _least_like_train(emb: Embeddings, marked: int) -> list[int]:
    if not {"train", "test"} <= set(emb.split_names):
        return []
    test = emb.rows("test")
    similarity = NeighbourIndex(emb.features("train")).query(emb.features("test"), 1)[1][:, 0]
    return test[np.argsort(similarity, kind="stable")[:marked]].tolist()


def _sample(rows: np.ndarray, kept: set[int], max_points: int, seed: int) -> np.ndarray:
    if len(rows) <= max_points:
        return rows
    others = rows[~np.isin(rows, list(kept))]
    drawn = np.random.default_rng(seed).choice(others, max(0, max_points - len(kept)), replace=False)
    return np.sort(np.concatenate([drawn, np.array(sorted(kept), dtype=rows.dtype)]))


def _layout(features: np.ndarray, method: str, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA

    if features.shape[1] > 50 and len(features) > 50:
        features = PCA(50, random_state=seed).fit_transform(features)
    if method == "umap":
        import umap

        with warnings.catch_warnings():  # a seed makes UMAP run on one thread, and it says so every time
            warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)
            return umap.UMAP(random_state=seed).fit_transform(features)
    from sklearn.manifold import TSNE

    perplexity = min(30.0, (len(features) - 1) / 3)
    return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)
