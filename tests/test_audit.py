"""featx audit: shift between splits and near-duplicates, on generated embeddings and a real tiny extraction."""

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from featx.shift.audit import DUPLICATE_COSINE, leaked_rows, near_duplicates, shift_between, two_sample_test
from featx.cli.commands import audit, main
from featx.store.embeddings import Embeddings


def embeddings(features, labels, splits, tmp_path=None) -> Embeddings:
    n = len(labels)
    return Embeddings(tmp_path or "mem.h5", {"backbone": "test", "cache_key": "k"}, ["a", "b"],
                      np.array([f"img{i}.jpg" for i in range(n)]), np.array(splits), np.ones(n, bool),
                      np.array([""] * n), features.astype(np.float16), np.array(labels))


def cnn_like(rng, n, dim=64, contrast=1.0, brightness=0.0):
    """Non-negative correlated features, and what a contrast/brightness change of the images does to them."""
    basis = np.random.default_rng(0).normal(0, 1, (8, dim))
    return np.maximum(contrast * (rng.normal(0, 1, (n, 8)) @ basis) + brightness, 0)


def test_a_contrast_and_brightness_shift_is_found_and_two_halves_of_one_set_are_not():
    rng = np.random.default_rng(1)
    same = two_sample_test(cnn_like(rng, 300), cnn_like(rng, 300), seed=0)
    assert 0.4 < same.auc < 0.6 and same.p_value > 0.05 and not same.shifted
    shifted = two_sample_test(cnn_like(rng, 300), cnn_like(rng, 300, contrast=0.7, brightness=0.8), seed=0)
    assert shifted.auc > 0.7 and shifted.p_value < 0.01 and shifted.shifted


def test_a_different_class_balance_alone_is_no_shift_within_classes():
    rng = np.random.default_rng(2)
    centre = np.r_[np.zeros(32), np.full(32, 3.0)]

    def sample(n_a, n_b):
        return np.concatenate([rng.normal(0, 1, (n_a, 64)), rng.normal(0, 1, (n_b, 64)) + centre])

    features = np.concatenate([sample(200, 200), sample(360, 40)])  # train 50/50, test 90/10
    labels = [0] * 200 + [1] * 200 + [0] * 360 + [1] * 40
    emb = embeddings(features, labels, ["train"] * 400 + ["test"] * 400)
    report = shift_between(emb, "train", "test")
    assert report.overall.auc > 0.6  # the mix differs …
    assert not any(test.shifted for test in report.per_class.values())  # … but no class's images do
    assert set(report.per_class) == {"a", "b"} and len(report.least_alike_paths) == 10


def test_near_duplicates_across_splits_are_leaks_and_distinct_rows_are_not():
    rng = np.random.default_rng(3)
    originals = np.abs(rng.normal(0, 1, (40, 128)))
    copies = originals[:5] * 1.02 + np.abs(rng.normal(0, 0.05, (5, 128)))  # re-encoded, slightly changed
    emb = embeddings(np.concatenate([originals, copies]), [0, 1] * 20 + [0] * 5,
                     ["train"] * 40 + ["test"] * 5)
    pairs = near_duplicates(emb, block=16)  # blocks smaller than the file: pairs across blocks too
    assert sorted((p.first, p.second) for p in pairs) == [(i, 40 + i) for i in range(5)]
    assert leaked_rows(emb, pairs, into="test", from_="train") == {40, 41, 42, 43, 44}


def test_the_audit_command_reports_shift_and_writes_the_pairs(tmp_path):
    from featx.store.embeddings import EmbeddingWriter

    rng = np.random.default_rng(4)
    features = np.concatenate([cnn_like(rng, 200), cnn_like(rng, 100, contrast=0.7, brightness=0.8)])
    features[200] = features[0]  # one test image is a train image
    labels = [0, 1] * 150
    writer = EmbeddingWriter(tmp_path / "e.h5", dim=64, paths=[f"{i}.jpg" for i in range(300)], labels=labels,
                             splits=["train"] * 200 + ["test"] * 100,
                             attrs={"backbone": "test", "cache_key": "k", "classes": ["a", "b"]})
    writer.write(features.astype(np.float16), np.ones(300, bool), [""] * 300)
    result = CliRunner().invoke(main, ["audit", str(writer.finish()), "--out", str(tmp_path / "audit"),
                                       "--duplicate-cosine", "0.99"])  # 8-dim features: many rows are alike
    assert result.exit_code == 0, result.output
    assert "warning: test differs from train" in result.output and "1 test images have one in train" in result.output
    summary = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert summary["shift"]["shifted"] and summary["duplicates"]["leaked_into_test"] == 1
    assert set(summary["shift"]["tests"]) == {"overall", "class a", "class b"}
    assert "0.jpg,train,200.jpg,test" in (tmp_path / "audit" / "duplicates.csv").read_text()
    default = next(p.default for p in audit.params if p.name == "duplicate_cosine")
    assert default == DUPLICATE_COSINE
    alike = CliRunner().invoke(main, ["audit", str(tmp_path / "e.h5"), "--duplicate-cosine", "0.6"])
    assert "more pairs than images" in alike.output and "try --duplicate-cosine 0.9" in alike.output


def test_compare_warns_about_shift_and_records_it_only_when_there_is_some(tmp_path, caplog):
    from featx.comparison.evaluate import compare
    from featx.store.embeddings import EmbeddingWriter

    def write(name, test_contrast, test_brightness):
        rng = np.random.default_rng(5)
        features = np.concatenate([cnn_like(rng, 200), cnn_like(rng, 100, contrast=test_contrast, brightness=test_brightness)])
        writer = EmbeddingWriter(tmp_path / name, dim=64, paths=[f"{i}.jpg" for i in range(300)],
                                 labels=[0, 1] * 150, splits=["train"] * 200 + ["test"] * 100,
                                 attrs={"backbone": name, "cache_key": name, "classes": ["a", "b"]})
        writer.write(features.astype(np.float16), np.ones(300, bool), [""] * 300)
        return writer.finish()

    with caplog.at_level("WARNING", logger="featx"):
        alike = compare([write("alike.h5", 1.0, 0.0)], ["logreg"])
    assert "differ from the training ones" not in caplog.text
    assert alike.settings["shift"]["alike.h5"]["tests"]["overall"]["p_value"] is None  # too low to permute
    with caplog.at_level("WARNING", logger="featx"):
        shifted = compare([write("shifted.h5", 0.7, 0.8)], ["logreg"])
    assert "shifted.h5: the test images differ from the training ones" in caplog.text
    assert shifted.settings["shift"]["shifted.h5"]["shifted"]


def test_flipped_labels_are_found_among_the_likely_label_errors():
    from featx.shift.audit import label_issues, outliers

    rng = np.random.default_rng(6)
    centres = rng.normal(0, 1, (2, 32)) * 1.5
    truth = np.arange(300) % 2
    features = centres[truth] + rng.normal(0, 1, (300, 32))
    given = truth.copy()
    flipped = np.arange(0, 300, 30)  # ten labels flipped
    given[flipped] = 1 - given[flipped]
    features[7] = 40.0  # one image unlike either class
    emb = embeddings(features, given, ["train"] * 300)
    issues = label_issues(emb, "train")
    found = {issue.row for issue in issues}
    assert len(found & set(flipped)) >= 9  # nearly every flipped label …
    assert len(found - set(flipped)) <= 5  # … and few correct ones
    assert all(issue.suggested == truth[issue.row] for issue in issues if issue.row in set(flipped))
    assert outliers(emb, "train", count=1)[0][0] == 7


def smooth_image(seed: int, size: int = 256):
    """A photo-like image: coloured noise on a coarse grid, smoothly upsampled."""
    from PIL import Image

    coarse = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((size, size), Image.BICUBIC)


def _distance(root: Path, a: str, b: str) -> int:
    from featx.shift.audit import difference_hash

    return bin(difference_hash(root / a) ^ difference_hash(root / b)).count("1")


def test_perceptual_hash_confirms_copies_and_identical_files_are_found(tmp_path):
    from featx.shift.audit import audit as run_audit

    root = tmp_path / "photos"
    root.mkdir()
    names = []
    for seed in range(30):
        smooth_image(seed).save(root / f"{seed}.png")
        names.append(f"{seed}.png")
    original = smooth_image(0)
    original.save(root / "q60.jpg", quality=60)
    original.resize((128, 128)).save(root / "half.png")
    original.crop((6, 6, 250, 250)).save(root / "crop.png")
    (root / "same.png").write_bytes((root / "0.png").read_bytes())

    rng = np.random.default_rng(7)
    features = np.abs(rng.normal(0, 1, (34, 64)))
    features[30:] = features[0] * 1.01  # the copies' embeddings: near the original's
    names += ["q60.jpg", "half.png", "crop.png", "same.png"]
    emb = Embeddings(tmp_path / "e.h5", {"backbone": "test", "cache_key": "k", "dataset_root": str(root)}, ["a", "b"],
                     np.array(names), np.array(["train"] * 20 + ["test"] * 14), np.ones(34, bool), np.array([""] * 34),
                     features.astype(np.float16), np.arange(34) % 2)
    found = run_audit(emb, duplicate_cosine=0.99)
    assert found.exact == [[0, 33]]
    check = found.hashes
    # calibrated on the file's own images (the copies among them do not move it), capped for photos
    assert 32 <= check.same_image_bits <= 64 and check.random_pairs == 34 * 33 // 2
    assert max(_distance(root, "0.png", name) for name in ("q60.jpg", "half.png", "crop.png")) <= check.same_image_bits
    distinct = [_distance(root, f"{a}.png", f"{b}.png") for a in range(30) for b in range(a + 1, 30)]
    assert np.mean(np.array(distinct) <= check.same_image_bits) <= 0.01  # measured: 1 of 435 pairs
    assert all(check.confirms(p) for p in found.pairs)
    summary = found.summary()["duplicates"]
    assert summary["identical_files"] == {"groups": 1, "rows": 2, "across_splits": 1}
    assert summary["perceptual_hash"]["confirmed"] == len(found.pairs) >= 4
    assert summary["perceptual_hash"]["leaked_into_test"] == len(found.leaked) >= 1
    assert run_audit(emb, duplicate_cosine=0.99, images=False).hashes is None


@pytest.mark.slow  # ~5 s; the hash's own tests stay in the default run
def test_on_alike_images_the_hash_confirms_only_close_copies(tmp_path):
    """Chest X-rays are alike to a perceptual hash: a fixed photo threshold would confirm distinct ones."""
    from PIL import Image

    from featx.shift.audit import COPY_BITS, calibrate_hash, difference_hash

    shared = np.asarray(smooth_image(0), dtype=float)  # 70 % of every image: one anatomy, many patients
    for seed in range(1, 41):
        own = np.asarray(smooth_image(seed), dtype=float)
        Image.fromarray((0.7 * shared + 0.3 * own).astype(np.uint8)).save(tmp_path / f"{seed}.png")
    Image.open(tmp_path / "1.png").save(tmp_path / "q60.jpg", quality=60)
    Image.open(tmp_path / "1.png").resize((128, 128)).save(tmp_path / "half.png")
    bits, pairs, false_positive_rate = calibrate_hash([difference_hash(tmp_path / f"{s}.png") for s in range(1, 41)])
    assert bits < COPY_BITS // 2 and pairs == 780 and false_positive_rate == 0.0
    assert max(_distance(tmp_path, "1.png", copy) for copy in ("q60.jpg", "half.png")) <= bits
    assert min(_distance(tmp_path, f"{a}.png", f"{b}.png") for a in range(1, 41) for b in range(a + 1, 41)) > bits


def test_the_permutation_tests_logistic_regressions_are_scikit_learns():
    from sklearn.linear_model import LogisticRegression

    from featx.shift.audit import _fit_logistic

    rng = np.random.default_rng(6)
    X = rng.normal(0, 1, (120, 5))
    labellings = np.stack([(X[:, 0] + rng.normal(0, 1, 120) > 0), rng.permutation(np.arange(120) % 2)], axis=1)
    used = rng.random((120, 2)) < 0.8  # each fit on its own rows, as each fold is
    weights = _fit_logistic(np.c_[X, np.ones(120)], labellings.astype(float), used.astype(float))
    for j in range(2):
        reference = LogisticRegression(C=0.1, tol=1e-10, max_iter=10_000).fit(X[used[:, j]], labellings[used[:, j], j])
        np.testing.assert_allclose(weights[:-1, j], reference.coef_[0], atol=1e-6)
        np.testing.assert_allclose(weights[-1, j], reference.intercept_[0], atol=1e-6)
