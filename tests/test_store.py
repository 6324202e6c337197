import h5py
import numpy as np
import pytest

from featx.errors import DataError, SchemaError
from featx.store.embeddings import SCHEMA, CacheLock, EmbeddingWriter, cache_key, list_cache, load_embeddings


def write_file(path, n=6, dim=4, complete=True, rows=None):
    writer = EmbeddingWriter(
        path, dim=dim, paths=[f"c/{i}.jpg" for i in range(n)], labels=[i % 2 for i in range(n)],
        splits=["train", "train", "val", "test", "train", "test"][:n],
        attrs={"backbone": "toy", "classes": ["a", "b"], "cache_key": "k1"}, dtype="float32",
    )
    done = n if complete else (rows or 2)
    for start in range(0, done, 2):
        stop = min(start + 2, done)
        ok = np.ones(stop - start, bool)
        writer.write(np.full((stop - start, dim), start, np.float32), ok, [""] * (stop - start))
    if complete:
        return writer.finish()
    writer.close()
    return writer.partial


def test_round_trip_and_splits(tmp_path):
    path = write_file(tmp_path / "e.h5")
    assert path.exists() and not (tmp_path / "e.h5.partial").exists()
    emb = load_embeddings(path)
    assert emb.classes == ["a", "b"] and emb.meta["schema"] == SCHEMA
    assert emb.features("train").shape == (3, 4) and emb.features("train").dtype == np.float32
    assert emb.labels("test").tolist() == [1, 1]
    assert emb.paths_of("val").tolist() == ["c/2.jpg"]
    assert emb.split_names == ["train", "val", "test"]
    with pytest.raises(DataError, match="no rows in split 'holdout'"):
        emb.features("holdout")


def test_incomplete_file_is_refused_with_what_to_do(tmp_path):
    partial = write_file(tmp_path / "e.h5", complete=False, rows=4)
    with pytest.raises(SchemaError, match=r"incomplete \(rows_done=4 of 6\); run `featx extract` again"):
        load_embeddings(partial)


def test_resume_continues_at_rows_done(tmp_path):
    write_file(tmp_path / "e.h5", complete=False, rows=4)
    writer = EmbeddingWriter(tmp_path / "e.h5", dim=4, paths=["x"] * 6, labels=[0] * 6, splits=[""] * 6,
                             attrs={"backbone": "toy", "classes": ["a"], "cache_key": "k1"}, dtype="float32")
    assert writer.rows_done == 4
    writer.close()
    other = EmbeddingWriter(tmp_path / "e.h5", dim=4, paths=["x"] * 6, labels=[0] * 6, splits=[""] * 6,
                            attrs={"backbone": "toy", "classes": ["a"], "cache_key": "OTHER"}, dtype="float32")
    assert other.rows_done == 0  # a partial file from another configuration is not reused
    other.close()


def test_wrong_files_are_refused_with_the_mismatch(tmp_path):
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(SchemaError, match="text.h5: not an HDF5 file"):
        load_embeddings(tmp_path / "text.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.attrs["schema"] = "someone.else/3"
    with pytest.raises(SchemaError, match=r"unknown schema 'someone.else/3'; this featx reads 'featx.embeddings/1'"):
        load_embeddings(tmp_path / "other.h5")
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(SchemaError, match="no 'schema' attribute"):
        load_embeddings(tmp_path / "plain.h5")
    path = write_file(tmp_path / "e.h5")
    with h5py.File(path, "a") as f:
        del f["ok"]
    with pytest.raises(SchemaError, match="missing ok"):
        load_embeddings(path)


def test_lock_refuses_a_second_writer(tmp_path):
    with CacheLock(tmp_path / "x.h5"):
        with pytest.raises(DataError, match="another featx process is writing"):
            with CacheLock(tmp_path / "x.h5"):
                pass
    with CacheLock(tmp_path / "x.h5"):  # released after use
        pass


def test_cache_keys_of_existing_files_still_match_and_every_recipe_field_counts():
    """The committed fixture was extracted by an earlier featx: its recorded recipe must still hash to its key,
    or every user's cache would be recomputed."""
    from pathlib import Path

    meta = load_embeddings(Path(__file__).parent / "fixtures" / "chest_xray_efficientnet_lite0.h5").meta
    recipe = meta["recipe"]
    assert cache_key(recipe) == meta["cache_key"] == "1772f79db1"
    assert cache_key(dict(reversed(recipe.items()))) == meta["cache_key"]  # field order does not matter
    changed = {"dataset_fingerprint": "0" * 64, "backbone": "resnet50", "weights_sha256": "none",
               "preprocess": {**recipe["preprocess"], "fit": "full"}, "layer": "stages", "pooling": "max",
               "tta": True, "dtype": "float32", "precision": "bf16"}
    assert set(changed) == set(recipe)
    keys = {cache_key({**recipe, field: value}) for field, value in changed.items()}
    assert len(keys) == len(changed) and meta["cache_key"] not in keys


def test_list_cache_reports_complete_partial_and_broken(tmp_path):
    write_file(tmp_path / "ds" / "good.h5")
    write_file(tmp_path / "ds" / "half.h5", complete=False)
    (tmp_path / "ds" / "junk.h5").write_text("x")
    entries = {e["path"].split("/")[-1]: e for e in list_cache(tmp_path)}
    assert entries["good.h5"]["complete"] and entries["good.h5"]["rows"] == 6
    assert not entries["half.h5.partial"]["complete"] and entries["half.h5.partial"]["rows_done"] == 2
    assert "not an HDF5 file" in entries["junk.h5"]["problem"]


def test_committed_fixture_is_a_valid_embedding_file():
    from pathlib import Path

    emb = load_embeddings(Path(__file__).parent / "fixtures" / "chest_xray_efficientnet_lite0.h5")
    assert emb.meta["backbone"] == "efficientnet_lite0" and emb.meta["dtype"] == "float16"
    assert emb.classes == ["NORMAL", "PNEUMONIA"]
    assert emb.features("train").shape == (200, 1280) and emb.features("test").shape == (80, 1280)
    assert np.bincount(emb.labels("train")).tolist() == [80, 120]


def test_lazy_features_come_back_in_the_order_asked():
    from pathlib import Path

    fixture = Path(__file__).parent / "fixtures" / "chest_xray_efficientnet_lite0.h5"
    eager, lazy = load_embeddings(fixture), load_embeddings(fixture, lazy=True)
    rows = np.array([200, 3, 150, 3, 0])  # unsorted, with a repeat: as a carved validation split is
    np.testing.assert_array_equal(lazy.features_at(rows), eager.features_at(rows))
    np.testing.assert_array_equal(lazy.features("test"), eager.features("test"))
