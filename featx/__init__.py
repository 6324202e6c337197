"""featx: pretrained CNNs as frozen feature extractors, embeddings cached in HDF5, cheap heads on top."""

import importlib
import logging

from featx.embed.backbones import list_backbones
from featx.data.datasets import scan_dataset
from featx.errors import ConfigError, DataError, FeatxError, SchemaError, WeightsError
from featx.store.embeddings import load_embeddings
from featx.version import __version__

# Imported on first use: extraction, fine-tuning and prediction pull in torch, heads pull in scikit-learn;
# `import featx` needs neither. No module is named like a function here, so none can shadow one.
_LAZY = {
    "extract": "featx.embed.extraction", "ExtractConfig": "featx.embed.planning",
    "finetune": "featx.finetuning.training", "FinetuneConfig": "featx.finetuning.config",
    "compare": "featx.comparison.evaluate", "CompareConfig": "featx.comparison.config", "list_heads": "featx.heads.registry",
    "save_run": "featx.comparison.runs", "load_run": "featx.comparison.runs",
    "dataset_map": "featx.comparison.embedding_map",
    "Predictor": "featx.use.predict", "write_report": "featx.use.report", "advise": "featx.use.advisor",
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
