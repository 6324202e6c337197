"""Fixtures for your own tests: small embedding files made without torch and without images.

``make_embeddings(path, n=200, dim=64, classes=3, seed=0)`` writes a synthetic file; ``subset_embeddings(file,
out, per_class=20)`` a stratified subset of a real one (``featx subset`` on the command line). Both load with
``featx.load_embeddings``, pass ``featx doctor`` and go through ``compare`` like any cached file.
"""

import importlib

# Imported on first use, as featx's own public API is (featx/__init__.py).
_LAZY = {"make_embeddings": "featx.store.fixtures", "subset_embeddings": "featx.store.fixtures"}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'featx.testing' has no attribute {name!r}")
