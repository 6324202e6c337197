"""Embeddings where analysts work: an embedding file as Parquet, or as ``.npy`` features beside a CSV of its rows.

Row for row, in file order: path, label (the class name, empty where unlabelled), label_index (-1 there), split,
ok, error, content (the image's content hash, where the file records it) and the features as float32 — every
row, unreadable ones (zeros, ``ok`` false) and augmented copies included, so that ``ok`` and ``split`` select as
``Embeddings.rows`` does. The file is read and written a block of rows at a time (Parquet row groups, the ``.npy``
appended to), so memory stays flat whatever the number of rows. The file's provenance goes with it: Parquet's
key-value metadata under ``featx``, or a JSON file beside the ``.npy``.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import h5py
import numpy as np

from featx.errors import ConfigError, DataError
from featx.store.embeddings import WRITING_ATTRS, Embeddings, damaged, load_embeddings
from featx.vocab import check

BLOCK_ROWS = 8192  # rows read from the HDF5 file and written as one Parquet row group at a time


def import_pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise ConfigError("writing Parquet needs pyarrow: pip install 'featx[pandas]'") from None
    return pyarrow


def default_out(path: Path, format: str, split: str | None) -> Path:
    """``<file stem>[-<split>].parquet`` or ``.npy`` in the current folder."""
    return Path(f"{path.stem}{'-' + split if split else ''}.{format}")


def export_table(path: str | Path, format: str = "parquet", out: str | Path | None = None,
                 split: str | None = None) -> list[Path]:
    """Write the rows of embedding file ``path`` (of ``split`` only, when given) as ``format``; returns the files
    written (the ``.npy`` with its ``.csv`` and ``.json``). Each is written under a temporary name and renamed
    when complete, replacing a file of that name."""
    check("export", format=format)
    path = Path(path)
    emb = load_embeddings(path, lazy=True)
    rows = emb.rows_of(split)
    out = Path(out) if out else default_out(path, format, split)
    if out.resolve() == path.resolve():
        raise ConfigError(f"{out}: is the embedding file itself; choose another --out")
    writer = _write_parquet if format == "parquet" else _write_npy
    return writer(emb, rows, out)


def provenance(emb: Embeddings) -> dict:
    """What the embedding file says of how its rows were made, and where they came from."""
    return {"source": str(emb.path), **{k: v for k, v in emb.meta.items() if k not in WRITING_ATTRS - {"dtype"}}}


def _blocks(emb: Embeddings, rows: np.ndarray):
    """(rows, float32 features) a block at a time, read from the file as they are needed."""
    try:
        with h5py.File(emb.path, "r", locking=False) as handle:
            features = handle["features"]
            for start in range(0, len(rows), BLOCK_ROWS):
                block = rows[start:start + BLOCK_ROWS]
                contiguous = len(block) and block[-1] - block[0] == len(block) - 1
                values = features[block[0]:block[-1] + 1] if contiguous else features[block]
                yield block, np.asarray(values, dtype=np.float32)
    except OSError as err:
        raise damaged(emb.path, str(err).splitlines()[0]) from None


def _write_parquet(emb: Embeddings, rows: np.ndarray, out: Path) -> list[Path]:
    pa = import_pyarrow()
    dim = emb.dim
    schema = pa.schema([("path", pa.string()), ("label", pa.string()), ("label_index", pa.int32()),
                        ("split", pa.string()), ("ok", pa.bool_()), ("error", pa.string()),
                        ("content", pa.string()), ("embedding", pa.list_(pa.float32(), dim))],
                       metadata={"featx": json.dumps(provenance(emb))})
    partial = _partial(out)
    try:
        with pa.parquet.ParquetWriter(partial, schema) as writer:
            for block, values in _blocks(emb, rows):
                embedding = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), pa.float32()), dim)
                columns = emb.columns(block)
                writer.write_table(pa.table({**columns, "label_index": pa.array(columns["label_index"], pa.int32()),
                                             "embedding": embedding}, schema=schema))
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return [out]


def _write_npy(emb: Embeddings, rows: np.ndarray, out: Path) -> list[Path]:
    out = out if out.suffix == ".npy" else out.with_name(out.name + ".npy")
    table, about = out.with_suffix(".csv"), out.with_suffix(".json")
    partials = [_partial(p) for p in (out, table, about)]
    columns = list(emb.columns(rows[:0]))
    try:
        # Written block by block through a file handle: a memory map's dirty pages would count as the process's
        # memory until the end.
        with open(partials[0], "wb") as features, \
                open(partials[1], "w", newline="", encoding="utf-8", errors="surrogateescape") as handle:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                      "shape": (len(rows), emb.dim)}
            np.lib.format.write_array_header_1_0(features, header)
            writer = csv.writer(handle)
            writer.writerow(columns)
            for block, values in _blocks(emb, rows):
                features.write(np.ascontiguousarray(values).tobytes())
                writer.writerows(zip(*(emb.columns(block)[c] for c in columns)))
        partials[2].write_text(json.dumps({**provenance(emb), "rows": len(rows), "columns": columns}, indent=1))
        for partial, final in zip(partials, (out, table, about)):
            os.replace(partial, final)
    finally:
        for partial in partials:
            partial.unlink(missing_ok=True)
    return [out, table, about]


def _partial(path: Path) -> Path:
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; give --out a file name")
    if not path.parent.exists():
        raise DataError(f"{path.parent}: no such folder")
    return path.with_name(f".{path.name}.partial")
