"""featx: pretrained CNNs as frozen feature extractors, embeddings cached in HDF5, cheap heads on top."""

import logging

from featx.backbones import list_backbones
from featx.datasets import scan_dataset
from featx.errors import ConfigError, DataError, FeatxError, SchemaError, WeightsError
from featx.store import load_embeddings

__version__ = "0.1.0"
__all__ = [
    "ConfigError", "DataError", "FeatxError", "SchemaError", "WeightsError",
    "extract", "list_backbones", "load_embeddings", "scan_dataset",
]

logging.getLogger("featx").addHandler(logging.NullHandler())


def extract(*args, **kwargs):
    """Run a backbone over a dataset into the HDF5 cache; see ``featx.extract.extract``."""
    from featx.extract import extract as _extract  # torch is imported only when extraction is asked for

    return _extract(*args, **kwargs)
