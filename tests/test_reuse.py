"""A dataset that grows is embedded only where it changed: rows of earlier files of the same recipe are reused by
content, and the file equals a ``--force`` extraction of the same images bit for bit."""

from __future__ import annotations

import logging
from dataclasses import replace

import h5py
import numpy as np
import pytest

import featx.embed.extraction as extraction
from featx.embed.extraction import ExtractConfig, extract
from featx.store.embeddings import CONTENT, load_embeddings
from tests.conftest import make_class_folders, make_image


@pytest.fixture
def grown(tmp_path):
    data = make_class_folders(tmp_path / "colours", per_class=4, splits=("train", "val", "test"))
    config = ExtractConfig(backbone="resnet18", weights="none", image_size=64, batch_size=8, precision="fp32",
                           augment=1, tta_views=1, cache_dir=str(tmp_path / "cache"))
    return data, config


def same_file(a, b) -> None:
    x, y = load_embeddings(a), load_embeddings(b)
    for column in ("paths", "splits", "ok", "errors", "contents"):
        assert getattr(x, column).tolist() == getattr(y, column).tolist(), column
    np.testing.assert_array_equal(x.labels_at(), y.labels_at())
    assert np.array_equal(x.features_at(), y.features_at())  # bit for bit, not within a tolerance


def test_one_added_image_is_the_only_one_embedded_and_the_file_equals_a_forced_one(grown, counted, tmp_path):
    data, config = grown
    first = extract(data, config, progress=False)
    assert counted["images"] == first.rows == 36 + 12  # the images, then a copy of each train image
    make_image(data / "train" / "red" / "added.jpg", (240, 20, 20), seed=7)
    counted["images"] = 0
    grown_file = extract(data, config, progress=False)
    assert counted["images"] == 2 and grown_file.reused == 48 and grown_file.rows == 50  # the image and its copy
    assert grown_file.path != first.path and first.path.exists()  # an earlier version's file is left for prune
    forced = extract(data, replace(config, cache_dir=str(tmp_path / "forced")), progress=False, force=True)
    same_file(grown_file.path, forced.path)  # copies and views alike, whether reused or made afresh


def test_removed_images_embed_nothing(grown, counted, monkeypatch):
    data, config = grown
    extract(data, config, progress=False)
    (data / "test" / "blue").joinpath(sorted(p.name for p in (data / "test" / "blue").iterdir())[0]).unlink()
    monkeypatch.setattr(extraction, "load_model", lambda *a, **k: pytest.fail("no model is needed"))
    counted["images"] = 0
    smaller = extract(data, config, progress=False)
    assert counted["images"] == 0 and smaller.reused == smaller.rows == 47


def test_an_image_edited_in_place_and_a_renamed_one(grown, counted):
    data, config = grown
    extract(data, config, progress=False)
    image = sorted((data / "val" / "green").iterdir())[0]
    make_image(image, (10, 90, 200), seed=3)  # the same name, other pixels
    renamed = sorted((data / "test" / "red").iterdir())[0]
    renamed.rename(renamed.with_name("renamed.jpg"))
    counted["images"] = 0
    again = extract(data, config, progress=False)
    assert counted["images"] == 1 and again.reused == again.rows - 1


def test_files_without_content_and_adapt_bn_files_are_embedded_whole(grown, counted, caplog):
    data, config = grown
    config = replace(config, augment=0, tta_views=0)
    first = extract(data, config, progress=False)
    with h5py.File(first.path, "r+") as handle:  # as featx before 0.6 wrote it
        del handle[CONTENT]
    make_image(data / "train" / "red" / "added.jpg", (240, 20, 20), seed=7)
    counted["images"] = 0
    assert extract(data, config, progress=False).reused == 0 and counted["images"] == 37
    adapted = replace(config, adapt_bn=True)
    extract(data, adapted, progress=False)
    make_image(data / "train" / "red" / "another.jpg", (230, 30, 30), seed=8)
    with caplog.at_level(logging.INFO, logger="featx"):
        assert extract(data, adapted, progress=False).reused == 0
    assert "every row is embedded again" in caplog.text


def test_the_command_line_says_what_it_reused(grown, tmp_path):
    from click.testing import CliRunner

    from featx.cli.commands import main

    data, config = grown
    arguments = ["extract", str(data), "--backbone", "resnet18", "--weights", "none", "--image-size", "64",
                 "--precision", "fp32", "--out", config.cache_dir]
    assert CliRunner().invoke(main, arguments).exit_code == 0
    make_image(data / "train" / "blue" / "added.jpg", (20, 20, 240), seed=9)
    done = CliRunner().invoke(main, arguments)
    assert done.exit_code == 0 and "36 rows reused from earlier files, 1 embedded" in done.output


@pytest.mark.parametrize("chunk", [256, 0])  # 0: the rows count as scattered, read chunk by chunk
def test_rows_are_read_back_in_any_order(grown, chunk, monkeypatch):
    from featx.store import reuse

    monkeypatch.setattr(reuse, "CHUNK_ROWS", chunk)
    data, config = grown
    made = load_embeddings(extract(data, replace(config, augment=0, tta_views=0), progress=False).path)
    rows = reuse.ReusableRows([made.path])
    order = [0, 35, 1, 17, 35]  # far apart, back and forth, one twice
    features, ok, errors = rows.read([made.contents[k] for k in order])
    rows.close()
    assert np.array_equal(features, made.features_at(np.array(order))) and ok.all() and errors == [""] * 5


def test_a_renamed_copy_of_a_dataset_reuses_every_row_from_the_other_cache_folder(grown, counted, tmp_path):
    import shutil

    data, config = grown
    first = extract(data, config, progress=False)
    copy = shutil.copytree(data, tmp_path / "colours-2026")
    counted["images"] = 0
    renamed = extract(copy, config, progress=False)
    assert renamed.path.parent.name == "colours-2026" and renamed.path.parent != first.path.parent
    assert counted["images"] == 0 and renamed.reused == renamed.rows == first.rows
    same_file(renamed.path, first.path)
