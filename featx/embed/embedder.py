"""``ImageEmbedder``: a backbone as a scikit-learn transformer, image paths in, features out, through featx's cache.

Every call embeds its list of images as an embedding file of its own in ``cache_dir/images/``, whose rows of
images embedded before with the same recipe (by an earlier call, or by ``featx extract`` into the same cache) are
copied from the earlier files by content (``featx.store.reuse``), not embedded again. So ``GridSearchCV`` over a
pipeline that starts with it embeds each image once across all folds and candidates, and a second notebook
session embeds nothing. ``featx prune`` cleans the folder up (each call's file supersedes the one before it).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from featx.data.datasets import ImageDataset, Sample
from featx.embed.backbones import DEFAULT_BACKBONE
from featx.embed.extraction import extract_planned
from featx.embed.planning import ExtractConfig, plan_extraction
from featx.errors import DataError
from featx.store.embeddings import load_embeddings

DATASET_NAME = "images"  # the cache folder of the transformer's files, whatever images they hold


class ImageEmbedder(TransformerMixin, BaseEstimator):
    """Image paths (a list, an array or a pandas Series / one-column DataFrame) → pooled backbone features.

    ``fit`` embeds its images and learns nothing from them but the feature size; ``transform`` returns float32
    features in the order of the paths. The parameters are ``featx extract``'s of the same name.
    """

    def __init__(self, backbone: str = DEFAULT_BACKBONE, cache_dir: str = "cache", weights: str | None = None,
                 image_size: int | None = None, precision: str = "auto", device: str = "auto",
                 batch_size: int = 32, progress: bool = False):
        self.backbone = backbone
        self.cache_dir = cache_dir
        self.weights = weights
        self.image_size = image_size
        self.precision = precision
        self.device = device
        self.batch_size = batch_size
        self.progress = progress

    def fit(self, X, y=None):
        self.fit_transform(X)
        return self

    def fit_transform(self, X, y=None, **fit_params):
        features = self._embed(X)
        self.n_features_out_ = features.shape[1]
        return features

    def transform(self, X) -> np.ndarray:
        check_is_fitted(self, "n_features_out_")
        return self._embed(X)

    def get_feature_names_out(self, input_features=None) -> np.ndarray:
        check_is_fitted(self, "n_features_out_")
        return np.array([f"{self.backbone}_{i}" for i in range(self.n_features_out_)], dtype=object)

    def config(self) -> ExtractConfig:
        return ExtractConfig(backbone=self.backbone, cache_dir=str(self.cache_dir), weights=self.weights,
                             image_size=self.image_size, precision=self.precision, device=self.device,
                             batch_size=self.batch_size)

    def _embed(self, X) -> np.ndarray:
        files = image_paths(X)
        dataset = dataset_of(files)
        result = extract_planned(plan_extraction(dataset, self.config()), progress=self.progress)
        emb = load_embeddings(result.path)
        if not emb.ok.all():
            row = int(np.flatnonzero(~emb.ok)[0])
            raise DataError(f"{files[row]}: {emb.errors[row]} ({(~emb.ok).sum()} of {len(files)} images could not "
                            f"be read; their rows are in {result.path})")
        return emb.features_at()

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.one_d_array = True
        tags.input_tags.string = True
        return tags


def image_paths(X) -> list[Path]:
    """The image paths of ``X``: a list or 1-D array of strings or paths, a pandas Series, or a one-column 2-D
    array or DataFrame (as ``ColumnTransformer`` hands over one column)."""
    values = X.to_numpy() if hasattr(X, "to_numpy") else np.asarray(X, dtype=object)
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]
    if values.ndim != 1:
        raise DataError(f"ImageEmbedder takes a list of image paths (or one column of them); got an array of shape "
                        f"{values.shape}")
    if not len(values):
        raise DataError("ImageEmbedder got no image paths")
    wrong = [v for v in values if not isinstance(v, (str, os.PathLike))]
    if wrong:
        raise DataError(f"ImageEmbedder takes image paths; got {type(wrong[0]).__name__} {wrong[0]!r}")
    files = [Path(v).expanduser().absolute() for v in values]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise DataError(f"{missing[0]}: no such file ({len(missing)} of {len(files)} paths)")
    return files


def dataset_of(files: list[Path]) -> ImageDataset:
    """The images as an unlabelled dataset rooted at their common folder, in the order given."""
    root = Path(os.path.commonpath([f.parent for f in files]))
    samples = [Sample(str(f.relative_to(root)), -1, "") for f in files]
    return ImageDataset(root=root, name=DATASET_NAME, classes=[], samples=samples, split_source="none")
