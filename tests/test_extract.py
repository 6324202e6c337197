import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace

import h5py
import numpy as np
import pytest

from featx.data.datasets import ImageDataset, scan_dataset
from featx.errors import ConfigError, DataError, SchemaError
from featx.embed.extraction import extract
from featx.store.embeddings import CacheLock, load_embeddings
from tests.conftest import make_image

META_ATTRS = {
    "schema", "featx_version", "created", "backbone", "weights", "weights_sha256", "layer", "pooling",
    "image_size", "mean", "std", "tta", "dtype", "classes", "dataset_root", "dataset_fingerprint", "cache_key",
    "torch_version", "torchvision_version", "device", "rows_done", "complete",
}


def test_extract_writes_the_schema_and_finds_it_cached(image_folder, tiny_config):
    result = extract(image_folder, tiny_config, split="0.5,0.25,0.25", progress=False)
    assert not result.cached and result.rows == 18 and not result.failed
    emb = load_embeddings(result.path)
    assert META_ATTRS <= set(emb.meta)
    assert result.path.parent.name == "colours" and result.path.name.startswith("resnet18-")
    assert emb.features().shape == (18, 512)
    assert emb.classes == ["blue", "green", "red"]
    assert sorted(emb.split_names) == ["test", "train", "val"]
    assert emb.meta["complete"] and emb.meta["rows_done"] == 18 and emb.meta["image_size"] == 64
    assert np.isfinite(emb.features()).all() and emb.features().std() > 0
    mtime = result.path.stat().st_mtime_ns
    again = extract(image_folder, tiny_config, split="0.5,0.25,0.25", progress=False)
    assert again.cached and again.path == result.path and result.path.stat().st_mtime_ns == mtime


def test_changed_inputs_make_a_new_key(image_folder, tiny_config):
    first = extract(image_folder, tiny_config, progress=False).path
    assert extract(image_folder, replace(tiny_config, tta=True), progress=False).path != first
    assert extract(image_folder, replace(tiny_config, dtype="float32"), progress=False).path != first
    assert extract(image_folder, replace(tiny_config, backbone="resnet34"), progress=False).path != first
    make_image(image_folder / "red" / "new.jpg", (200, 30, 30), seed=999)
    added = extract(image_folder, tiny_config, progress=False)
    assert added.path != first and added.rows == 19



def test_a_copy_of_the_images_with_new_file_times_finds_the_cached_file(image_folder, tiny_config, tmp_path):
    first = extract(image_folder, tiny_config, progress=False)
    copy = shutil.copytree(image_folder, tmp_path / "restored" / image_folder.name, copy_function=shutil.copyfile)
    again = extract(copy, tiny_config, progress=False)
    assert again.cached and again.path == first.path


def test_files_cached_by_featx_before_0_3_are_still_found(image_folder, tiny_config, monkeypatch):
    with monkeypatch.context() as before_0_3:  # whose dataset fingerprint hashed file sizes and times
        before_0_3.setattr(ImageDataset, "fingerprint", ImageDataset.fingerprint_by_times)
        older = extract(image_folder, tiny_config, progress=False)
    again = extract(image_folder, tiny_config, progress=False)
    assert again.cached and again.path == older.path
    verified = extract(scan_dataset(image_folder, verify_content=True), tiny_config, progress=False)
    assert not verified.cached and verified.path != older.path  # asked to hash every file: not on times

def test_rows_follow_dataset_order_whatever_the_workers(image_folder, tiny_config):
    threads = load_embeddings(extract(image_folder, tiny_config, progress=False).path)
    procs = load_embeddings(extract(image_folder, replace(tiny_config, workers=2, out=str(image_folder.parent / "w.h5")),
                                    progress=False).path)
    assert threads.paths.tolist() == procs.paths.tolist()
    np.testing.assert_allclose(threads.features(), procs.features(), rtol=1e-3, atol=1e-3)
    # the red images (third class) are the reddest rows: order and content line up
    red = threads.labels() == threads.classes.index("red")
    assert all("red" in p for p in threads.paths[red])


def test_unreadable_images_are_recorded_and_skipped(image_folder, tiny_config):
    (image_folder / "red" / "empty.jpg").write_bytes(b"")
    (image_folder / "green" / "notes.jpg").write_text("not an image")
    good = (image_folder / "blue" / "blue_00.jpg").read_bytes()
    (image_folder / "blue" / "cut.jpg").write_bytes(good[: len(good) // 3])
    result = extract(image_folder, tiny_config, progress=False)
    assert {p for p, _ in result.failed} == {"red/empty.jpg", "green/notes.jpg", "blue/cut.jpg"}
    emb = load_embeddings(result.path)
    assert len(emb) == 21 and (~emb.ok).sum() == 3
    bad = np.flatnonzero(~emb.ok)
    assert (emb.features_at(bad) == 0).all()
    assert {emb.errors[i].split(" (")[0] for i in bad} == {"empty file", "not an image", "cannot decode"}
    assert len(emb.features()) == 18  # readers see readable rows only


def test_stages_and_tta(image_folder, tiny_config):
    stages = load_embeddings(extract(image_folder, replace(tiny_config, layer="stages"), progress=False).path)
    assert stages.features().shape[1] == 64 + 128 + 256 + 512
    plain = load_embeddings(extract(image_folder, tiny_config, progress=False).path).features()
    tta = load_embeddings(extract(image_folder, replace(tiny_config, tta=True), progress=False).path).features()
    assert tta.shape == plain.shape and not np.allclose(tta, plain)


def test_test_time_views_make_features_one_function_of_the_image_whatever_its_batch(image_folder, tiny_config):
    """--tta-views draws its K views once for all images, so a row does not depend on the batch it was in."""
    plain = load_embeddings(extract(image_folder, tiny_config, progress=False).path)
    config = replace(tiny_config, tta_views=2, aug="xray")
    views = load_embeddings(extract(image_folder, config, progress=False).path)
    alone = load_embeddings(extract(image_folder, replace(config, batch_size=1, out=str(image_folder.parent / "1.h5")),
                                    progress=False).path)
    assert views.meta["cache_key"] != plain.meta["cache_key"] and views.meta["tta_views"] == 2
    assert not np.allclose(views.features(), plain.features(), rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(alone.features(), views.features(), rtol=1e-3, atol=1e-3)
    with pytest.raises(ConfigError, match="test-time views need transforms"):
        replace(tiny_config, tta_views=2, aug="none")


CRASHING_CHILD = textwrap.dedent("""
    import os, signal, sys
    from featx.store import embeddings as store
    from featx.embed.extraction import ExtractConfig, extract
    write = store.EmbeddingWriter.write
    def write_then_die(self, *args):
        write(self, *args)
        if self.rows_done >= 8:
            os.kill(os.getpid(), signal.SIGKILL)  # as hard as a crash gets: no cleanup at all
    store.EmbeddingWriter.write = write_then_die
    extract(sys.argv[1], ExtractConfig(backbone="resnet18", weights="none", image_size=64, batch_size=4,
                                       cache_dir=sys.argv[2]), progress=False)
""")


@pytest.mark.slow  # the default run resumes to identical rows in test_hardening's full-disk test
def test_killed_extraction_resumes_to_identical_rows(image_folder, tiny_config, tmp_path):
    crashed = tmp_path / "crashed"
    child = subprocess.run([sys.executable, "-c", CRASHING_CHILD, str(image_folder), str(crashed)],
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == -9, child.stderr
    partial = next(crashed.rglob("*.h5.partial"))
    with h5py.File(partial) as f:
        assert f.attrs["rows_done"] == 8 and not f.attrs["complete"]
    with pytest.raises(SchemaError, match="incomplete"):
        load_embeddings(partial)

    resumed = extract(image_folder, replace(tiny_config, cache_dir=str(crashed)), progress=False)
    assert resumed.resumed_from == 8 and not partial.exists()
    whole = extract(image_folder, tiny_config, progress=False)
    assert resumed.path.name == whole.path.name
    a, b = load_embeddings(resumed.path), load_embeddings(whole.path)
    assert a.paths.tolist() == b.paths.tolist()
    np.testing.assert_array_equal(a.features(), b.features())


def test_a_second_process_on_the_same_key_is_refused(image_folder, tiny_config):
    first = extract(image_folder, tiny_config, progress=False).path
    first.unlink()
    with CacheLock(first):
        with pytest.raises(DataError, match="another featx process is writing"):
            extract(image_folder, tiny_config, progress=False)


def test_augmented_copies_of_train_images_are_extra_rows_made_the_same_every_run(image_folder, tiny_config):
    config = replace(tiny_config, augment=2, aug="xray")
    result = extract(image_folder, config, split="0.5,0.25,0.25", progress=False)
    emb = load_embeddings(result.path)
    plain = load_embeddings(extract(image_folder, tiny_config, split="0.5,0.25,0.25", progress=False).path)
    train = emb.paths_of("train")
    assert result.rows == 18 + 2 * len(train) and emb.n_copies == 2 * len(train)
    assert emb.features().shape == (18, 512) and emb.meta["recipe"]["augment"] == {"copies": 2, "aug": "xray", "seeds": "content"}
    copies, labels = emb.augmented_copies(train[:1])
    assert len(copies) == 2 and (labels == emb.labels("train")[0]).all()
    # the copies are other pictures of the image, not the image again or each other
    original = plain.features("train")[0]
    assert not np.allclose(copies[0], original, atol=1e-2) and not np.allclose(copies[0], copies[1], atol=1e-2)
    assert emb.augmented_copies(emb.paths_of("test"))[0].shape == (0, 512)
    again = load_embeddings(extract(image_folder, replace(config, out=str(image_folder.parent / "again.h5")),
                                    split="0.5,0.25,0.25", progress=False).path)
    np.testing.assert_array_equal(again.augmented_copies(train)[0], emb.augmented_copies(train)[0])


def test_full_fit_keeps_the_image_edges_and_its_own_cache_key(image_folder, tiny_config):
    cropped = extract(image_folder, tiny_config, progress=False)
    full = extract(image_folder, replace(tiny_config, fit="full"), progress=False)
    assert full.path != cropped.path
    assert load_embeddings(full.path).meta["recipe"]["preprocess"]["fit"] == "full"
    assert "fit" not in load_embeddings(cropped.path).meta["recipe"]["preprocess"]
    with pytest.raises(ConfigError, match="'fit' parameter"):
        extract(image_folder, replace(tiny_config, fit="stretch"), progress=False)
    with pytest.raises(ConfigError, match="augmented copies need transforms"):
        extract(image_folder, replace(tiny_config, augment=1, aug="none"), progress=False)


def test_adapt_bn_embeds_each_split_with_its_own_statistics_and_never_reads_labels(tmp_path, tiny_config):
    from PIL import Image

    from featx.embed.extraction import _adaptation_images, load_model
    from featx.embed.planning import plan_extraction
    from tests.conftest import COLOURS

    root = tmp_path / "scanners"  # test: the training images again, at 60 % contrast (another scanner)
    for c, (name, colour) in enumerate(COLOURS.items()):
        (root / "test" / name).mkdir(parents=True)
        for i in range(6):
            original = make_image(root / "train" / name / f"{name}_{i}.jpg", colour, seed=10 * c + i)
            darker = (np.asarray(Image.open(original)) * 0.6).astype(np.uint8)
            Image.fromarray(darker).save(root / "test" / name / f"{name}_{i}.jpg", quality=95)
    plain = load_embeddings(extract(root, tiny_config, progress=False).path)
    adapted_config = replace(tiny_config, adapt_bn=True)
    adapted = load_embeddings(extract(root, adapted_config, progress=False).path)
    assert adapted.cache_key != plain.cache_key and "adapt_bn" in adapted.meta["recipe"]

    def shift(emb):  # the distance between the splits' mean features, in standard deviations of train's
        train, test = emb.features("train"), emb.features("test")
        return np.linalg.norm(train.mean(0) - test.mean(0)) / np.linalg.norm(train.std(0))

    def found_originals(emb):  # the share of darker test images whose nearest training image is their original
        train, test = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (emb.features("train"),
                                                                             emb.features("test")))
        return float(((test @ train.T).argmax(1) == np.arange(len(test))).mean())

    assert emb_paths_match(plain) and shift(adapted) < 0.5 * shift(plain)
    assert found_originals(adapted) == 1.0 > found_originals(plain)
    plan = plan_extraction(root, adapted_config)
    relabelled = replace(plan, dataset=replace(plan.dataset, samples=[replace(s, label=(s.label + 1) % 3)
                                                                      for s in plan.dataset.samples]))
    assert _adaptation_images(plan, "test") == _adaptation_images(relabelled, "test")
    batch = torch_batch(root / "test" / "red" / "red_0.jpg", plan)
    test_model, same_model = load_model(plan, adapt_to="test").model, load_model(relabelled, adapt_to="test").model
    pretrained = load_model(plan).model
    assert np.array_equal(test_model(batch).numpy(), same_model(batch).numpy())
    assert not np.allclose(test_model(batch).numpy(), pretrained(batch).numpy(), atol=1e-3)


def emb_paths_match(emb) -> bool:
    """Train and test rows pair up by file name (the test image is the darker copy of the train image)."""
    return [p.split("/")[-1] for p in emb.paths_of("train")] == [p.split("/")[-1] for p in emb.paths_of("test")]


def torch_batch(path, plan):
    import torch

    from featx.embed.feature_model import to_tensor
    from featx.data.images import load_image

    with torch.inference_mode():
        return to_tensor(load_image(path, plan.preprocess)).unsqueeze(0)
