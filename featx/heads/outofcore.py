"""The lightgbm head on more training rows than one machine holds: LightGBM's Dask interface over the HDF5 file.

The training rows become a Dask array read block by block on the workers (which must see the file
at the same path); only the validation and test rows, and a sample for the open-set calibration,
come into this process. ``num_leaves`` is tuned on the validation rows as the in-memory head does;
there is no PCA step (it would need every row at once), so trees see all the features.
"""

from __future__ import annotations

import logging
import time
import warnings

import numpy as np

from featx.heads.registry import FittedHead
from featx.heads.metrics import predict_labels
from featx.store.embeddings import Embeddings

log = logging.getLogger(__name__)
BLOCK_ROWS = 65_536  # rows read by one task: ~170 MB of 1280 float16 features
NUM_LEAVES = (7, 15, 31)  # the in-memory lightgbm head's grid
TREES = 300


def _read_rows(path: str, rows: np.ndarray) -> np.ndarray:
    import h5py

    with h5py.File(path, "r", locking=False) as handle:
        return handle["features"][rows].astype(np.float32)


def rows_array(emb: Embeddings, rows: np.ndarray):
    """A Dask array of the features of ``rows`` (sorted file rows), read where the tasks run, block by block."""
    import dask
    import dask.array as da

    dim = emb.dim
    blocks = [rows[(rows >= start) & (rows < start + BLOCK_ROWS)] for start in range(0, len(emb), BLOCK_ROWS)]
    parts = [da.from_delayed(dask.delayed(_read_rows)(str(emb.path), block), shape=(len(block), dim),
                             dtype=np.float32) for block in blocks if len(block)]
    return da.concatenate(parts)


def fit_lightgbm(client, emb: Embeddings, train_rows: np.ndarray, X_val: np.ndarray, y_val: np.ndarray,
                 seed: int) -> FittedHead:
    """``DaskLGBMClassifier`` on ``train_rows`` of ``emb``, ``num_leaves`` chosen by validation balanced accuracy."""
    import dask.array as da
    from lightgbm.dask import DaskLGBMClassifier
    from sklearn.metrics import balanced_accuracy_score

    import lightgbm

    lightgbm.register_logger(log)  # its messages ("finding random open ports") into featx's log, not stdout
    began = time.perf_counter()
    X = rows_array(emb, train_rows)
    y = da.from_array(emb.labels_at(train_rows), chunks=(X.chunks[0],))
    best, best_score = None, -np.inf
    for leaves in NUM_LEAVES:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Parameter n_jobs will be ignored")  # Dask sets the threads
            model = DaskLGBMClassifier(client=client, n_estimators=TREES, learning_rate=0.05, num_leaves=leaves,
                                       class_weight="balanced", subsample=0.8, subsample_freq=1, colsample_bytree=0.8,
                                       random_state=seed, verbose=-1).fit(X, y)
        local = model.to_local()
        score = balanced_accuracy_score(y_val, predict_labels(local.predict_proba(X_val)))
        log.info("%s × lightgbm (out of core): num_leaves %d, validation balanced accuracy %.4f", emb.path.name,
                 leaves, score)
        if score > best_score:
            best, best_score = (leaves, local), score
    workers = len(client.scheduler_info().get("workers", {}))
    return FittedHead(name="lightgbm", pipeline=best[1], best_params={"num_leaves": best[0]},
                      tuning_score=float(best_score), tuned_on="validation split",
                      note=f"LightGBM out of core on all {len(train_rows)} training rows (Dask, {workers} workers; "
                           f"{TREES} trees, no PCA)", fit_seconds=time.perf_counter() - began)
