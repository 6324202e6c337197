"""featx: pretrained CNNs as frozen feature extractors, embeddings cached in HDF5, cheap heads on top."""

import logging

from featx.backbones import list_backbones
from featx.datasets import scan_dataset
from featx.errors import ConfigError, DataError, FeatxError, SchemaError, WeightsError
from featx.store import load_embeddings

__version__ = "0.1.0"
__all__ = [
    "ConfigError", "DataError", "FeatxError", "SchemaError", "WeightsError",
    "compare", "extract", "list_backbones", "list_heads", "load_embeddings", "scan_dataset",
]

logging.getLogger("featx").addHandler(logging.NullHandler())

# Imported on first use: extraction pulls in torch, heads pull in scikit-learn; `import featx` needs neither.
_LAZY = {"extract": "featx.extraction", "compare": "featx.evaluate", "list_heads": "featx.heads"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'featx' has no attribute {name!r}")
