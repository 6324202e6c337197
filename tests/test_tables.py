"""Embeddings where analysts work: Parquet and .npy exports row for row with the file, and DataFrames from the API."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

import featx.store.tables as tables
from featx.cli.commands import main
from featx.store.embeddings import load_embeddings
from featx.store.fixtures import make_embeddings


@pytest.fixture
def damaged_rows(tmp_path):
    """A float16 file with an unreadable row and content hashes, as an extraction writes them."""
    path = make_embeddings(tmp_path / "e.h5", n=240, dim=24, dtype="float16")
    with h5py.File(path, "r+") as handle:
        handle["ok"][5] = False
        del handle.attrs["checksums"]  # the edit above would not match them; files before 0.2 had none either
    return path


def test_parquet_round_trip_is_bit_for_bit_row_for_row(damaged_rows, tmp_path, monkeypatch):
    monkeypatch.setattr(tables, "BLOCK_ROWS", 64)  # several row groups, the last one short
    out = tables.export_table(damaged_rows, "parquet", out=tmp_path / "e.parquet")[0]
    emb = load_embeddings(damaged_rows)
    frame = pd.read_parquet(out)
    assert len(frame) == len(emb) and pq.ParquetFile(out).metadata.num_row_groups == 4
    assert frame.path.tolist() == emb.paths.tolist() and frame.split.tolist() == emb.splits.tolist()
    assert frame.label.tolist() == [emb.classes[i] for i in emb.labels_at()]
    assert not frame.ok[5] and frame.ok.sum() == len(emb) - 1
    readable = np.stack(frame.embedding[frame.ok & (frame.split != "augmented")].to_numpy())
    assert readable.dtype == np.float32 and np.array_equal(readable, emb.features())
    train = frame[frame.ok & (frame.split == "train")]
    assert np.array_equal(np.stack(train.embedding.to_numpy()), emb.features("train"))
    provenance = json.loads(pq.read_schema(out).metadata[b"featx"])
    assert provenance["cache_key"] == emb.cache_key and provenance["source"] == str(damaged_rows)


def test_npy_and_its_csv_hold_one_split_in_file_order(damaged_rows, tmp_path):
    written = tables.export_table(damaged_rows, "npy", out=tmp_path / "test", split="test")
    assert [p.name for p in written] == ["test.npy", "test.csv", "test.json"]
    emb = load_embeddings(damaged_rows)
    rows = pd.read_csv(written[1], keep_default_na=False)
    assert rows.path.tolist() == emb.paths_of("test").tolist() and set(rows.split) == {"test"}
    assert np.array_equal(np.load(written[0]), emb.features("test"))
    assert json.loads(written[2].read_text())["rows"] == len(rows)


def test_to_pandas_has_the_same_columns_and_rows(damaged_rows):
    emb = load_embeddings(damaged_rows)
    frame = emb.to_pandas("val")
    assert frame.index.tolist() == emb.rows_of("val").tolist()
    assert list(frame.columns) == ["path", "label", "label_index", "split", "ok", "error", "content", "embedding"]
    assert not frame.ok[5]  # the unreadable row is there, and selected out as features() does
    assert np.array_equal(np.stack(frame.embedding[frame.ok].to_numpy()), emb.features("val"))


def test_export_cli_writes_refuses_and_keeps_earlier_files(damaged_rows, tmp_path):
    runner = CliRunner()
    out = tmp_path / "all.parquet"
    result = runner.invoke(main, ["export", str(damaged_rows), "--format", "parquet", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "all.parquet" in result.output and len(pd.read_parquet(out)) == 240
    wrong = runner.invoke(main, ["export", str(damaged_rows), "--format", "npy", "--split", "holdout"])
    assert wrong.exit_code == 2 and "no rows in split 'holdout'" in wrong.output
    mixed = runner.invoke(main, ["export", str(damaged_rows), "--onnx", str(tmp_path / "m.onnx")])
    assert mixed.exit_code == 2 and "--format parquet|npy" in mixed.output
    nowhere = runner.invoke(main, ["export", str(damaged_rows), "--format", "npy", "--out",
                                   str(tmp_path / "missing" / "x.npy")])
    assert nowhere.exit_code == 2 and "no such folder" in nowhere.output
    assert len(pd.read_parquet(out)) == 240 and not list(tmp_path.glob(".*.partial"))


def test_a_failed_export_leaves_no_file_under_the_final_name(damaged_rows, tmp_path, monkeypatch):
    def broken(emb, rows):
        yield rows[:10], np.zeros((10, emb.dim), np.float32)
        raise OSError("disk full")

    monkeypatch.setattr(tables, "_blocks", broken)
    with pytest.raises(OSError):
        tables.export_table(damaged_rows, "parquet", out=tmp_path / "x.parquet")
    assert list(tmp_path.iterdir()) == [damaged_rows]


def test_leaderboard_frame_keeps_its_order(tmp_path):
    from featx.comparison.evaluate import compare

    board = compare([load_embeddings(make_embeddings(tmp_path / "s.h5", n=150, dim=8))], heads=["logreg", "knn"])
    frame = board.to_pandas()
    assert frame["head"].tolist() == [r["head"] for r in board.rows]
    assert frame.val_balanced_accuracy.tolist() == [r["val_balanced_accuracy"] for r in board.rows]
