"""featx inside scikit-learn: ``from featx.sklearn import ImageEmbedder``, image paths to features in a Pipeline.

Re-exported lazily, as ``featx`` does: the transformer lives in ``featx.embed.embedder`` and brings torch with it.
"""

import importlib

_LAZY = {"ImageEmbedder": "featx.embed.embedder"}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'featx.sklearn' has no attribute {name!r}")
