"""Small embedding files for tests: a stratified subset of a real one, or a synthetic one.

Both are complete ``featx.embeddings/1`` files (checksummed, ``featx doctor`` passes them) that ``compare`` and a
saved head read like any other, made without torch and without images, so an analyst's own test suite runs on
them in a second. ``featx.testing`` re-exports them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from featx.errors import DataError
from featx.store.embeddings import AUGMENTED, WRITING_ATTRS, EmbeddingWriter, load_embeddings, read_meta
from featx.version import __version__
from featx.vocab import check, invalid



def _write(path: Path, features: np.ndarray, labels, paths, splits, attrs: dict, dtype: str,
           ok: np.ndarray | None = None, errors=None) -> Path:
    path = Path(path)
    if path.exists():
        raise DataError(f"{path}: exists; choose another --out (an embedding file is never overwritten in place)")
    writer = EmbeddingWriter(path, dim=features.shape[1], paths=list(paths), labels=list(labels), splits=list(splits),
                             attrs=attrs, dtype=dtype)
    writer.write(features.astype(dtype), np.ones(len(labels), bool) if ok is None else ok,
                 [""] * len(labels) if errors is None else list(errors))
    return writer.finish()


def subset_embeddings(source: str | Path, out: str | Path, per_class: int = 20, *, dtype: str | None = None,
                      seed: int = 0) -> Path:
    """Up to ``per_class`` rows of every class in every split of ``source`` (and of its unlabelled rows), drawn
    with ``seed``, in file order, into ``out``; the provenance is kept, and ``subset_of`` says where they came from.
    Augmented copies are left out."""
    check("subset", seed=seed, **({"dtype": dtype} if dtype else {}))
    if not isinstance(per_class, int) or per_class < 1:
        raise invalid("per_class", "subset", "a positive int", per_class)
    emb = load_embeddings(source).without_copies()
    meta = read_meta(emb.path)
    dtype = dtype or meta.get("dtype", "float32")
    rng = np.random.default_rng(seed)
    labels = emb.labels_at()
    chosen = []
    for split in sorted(set(emb.splits.tolist()) - {AUGMENTED}):
        for label in sorted(set(labels[emb.splits == split].tolist())):
            rows = np.flatnonzero((emb.splits == split) & (labels == label))
            chosen += rng.choice(rows, min(per_class, len(rows)), replace=False).tolist()
    rows = np.sort(np.array(chosen, dtype=int))
    key = hashlib.sha256(f"{emb.cache_key}:subset:{per_class}:{seed}:{dtype}".encode()).hexdigest()[:10]
    attrs = {**{k: v for k, v in meta.items() if k not in WRITING_ATTRS}, "cache_key": key,
             "subset_of": {"path": str(emb.path), "cache_key": emb.cache_key, "rows": len(emb.paths),
                           "per_class": per_class, "seed": seed}}
    return _write(Path(out), emb.features_at(rows), labels[rows], emb.paths[rows], emb.splits[rows], attrs, dtype,
                  ok=emb.ok[rows], errors=emb.errors[rows])


def make_embeddings(path: str | Path, n: int = 200, dim: int = 64, classes: int = 3, seed: int = 0,
                    dtype: str = "float32") -> Path:
    """A synthetic file of ``n`` rows: ``classes`` Gaussian clusters in ``dim`` dimensions that a linear head
    separates well but not perfectly, split 70/15/15 (stratified, seeded), paths ``class<k>/<i>.jpg``."""
    check("make_embeddings", seed=seed, dtype=dtype)
    if n < 10 * classes or classes < 2 or dim < 2:
        raise DataError(f"make_embeddings needs at least 2 classes, 2 dimensions and 10 rows a class; got n={n}, "
                        f"dim={dim}, classes={classes}")
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    # Centres about 3 noise widths apart: a linear head is right about nine times in ten.
    centres = rng.normal(0, 3.0 / np.sqrt(2 * dim), (classes, dim))
    features = (centres[labels] + rng.normal(0, 1.0, (n, dim))).astype(np.float32)
    splits = np.empty(n, dtype=object)
    for label in range(classes):
        rows = rng.permutation(np.flatnonzero(labels == label))
        cut = np.round(np.array([0.7, 0.85]) * len(rows)).astype(int)
        splits[rows[:cut[0]]], splits[rows[cut[0]:cut[1]]], splits[rows[cut[1]:]] = "train", "val", "test"
    key = hashlib.sha256(f"synthetic:{n}:{dim}:{classes}:{seed}:{dtype}".encode()).hexdigest()[:10]
    attrs = {"featx_version": __version__, "backbone": "synthetic", "label": "synthetic", "cache_key": key,
             "classes": [f"class{k}" for k in range(classes)], "dataset_name": "synthetic",
             "synthetic": {"n": n, "dim": dim, "classes": classes, "seed": seed}}
    return _write(Path(path), features, labels, [f"class{k}/{i}.jpg" for i, k in enumerate(labels)], splits, attrs,
                  dtype)
