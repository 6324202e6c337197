"""featx: pretrained CNNs as frozen feature extractors, embeddings cached in HDF5, cheap heads on top."""

import importlib
import logging

from featx.backbones import list_backbones
from featx.datasets import scan_dataset
from featx.errors import ConfigError, DataError, FeatxError, SchemaError, WeightsError
from featx.store import load_embeddings
from featx.version import __version__

# Imported on first use: extraction, fine-tuning and prediction pull in torch, heads pull in scikit-learn;
# `import featx` needs neither. No module is named like a function here, so none can shadow one.
_LAZY = {
    "extract": "featx.extraction", "ExtractConfig": "featx.planning",
    "finetune": "featx.finetuning", "FinetuneConfig": "featx.finetuning",
    "compare": "featx.evaluate", "list_heads": "featx.heads",
    "save_run": "featx.runs", "load_run": "featx.runs",
    "Predictor": "featx.predict", "write_report": "featx.report", "advise": "featx.advisor",
}
__all__ = [
    "ConfigError", "DataError", "FeatxError", "SchemaError", "WeightsError", "__version__",
    "list_backbones", "load_embeddings", "scan_dataset", *_LAZY,
]

logging.getLogger("featx").addHandler(logging.NullHandler())


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'featx' has no attribute {name!r}")
