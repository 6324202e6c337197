import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from featx.cli.commands import main
from featx.errors import ConfigError
from featx.comparison.evaluate import compare
from featx.comparison.leaderboard import Leaderboard
from featx.heads.metrics import choose_threshold, classification_metrics
from featx.comparison.runs import save_run
from featx.store.embeddings import load_embeddings

FIXTURE = Path(__file__).parent / "fixtures" / "chest_xray_efficientnet_lite0.h5"


def test_metrics_match_hand_computed_values():
    y = np.array([0, 0, 0, 1, 1])
    proba = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8], [0.45, 0.55]])
    m = classification_metrics(y, proba, ["neg", "pos"], with_ci=True)
    assert m["accuracy"] == pytest.approx(4 / 5)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["per_class"]["pos"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert m["roc_auc"] == pytest.approx(5 / 6)  # one of six positive/negative pairs is misordered
    assert m["confusion"] == [[2, 1], [0, 2]]
    assert m["confusion_normalised"][0] == pytest.approx([2 / 3, 1 / 3], abs=1e-4)
    low, high = m["accuracy_ci"]
    assert 0 <= low <= m["accuracy"] <= high <= 1
    strict = classification_metrics(y, proba, ["neg", "pos"], threshold=0.75)
    assert strict["confusion"] == [[3, 0], [1, 1]]


def test_multiclass_auc_is_one_vs_rest():
    y = np.array([0, 1, 2, 0, 1, 2])
    proba = np.eye(3)[y] * 0.8 + 0.2 / 3
    assert classification_metrics(y, proba, ["a", "b", "c"])["roc_auc"] == pytest.approx(1.0)


def test_threshold_objectives():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(300, int), np.ones(100, int)]
    p = np.clip(np.r_[rng.normal(0.3, 0.15, 300), rng.normal(0.6, 0.15, 100)], 0, 1)
    t = choose_threshold(y, p, "balanced_accuracy")
    assert 0.35 < t < 0.55
    sensitive = choose_threshold(y, p, "sensitivity=0.95")
    assert (p[y == 1] >= sensitive).mean() >= 0.95
    with pytest.raises(ConfigError, match="The 'threshold' parameter"):
        choose_threshold(y, p, "youden")


def test_compare_writes_a_complete_run_folder(tmp_path):
    emb = load_embeddings(FIXTURE)
    board = compare([emb], ["logreg", "knn"], threshold="balanced_accuracy")
    save_run(board, tmp_path / "run")
    assert [r["head"] for r in board.rows] and {r["head"] for r in board.rows} == {"logreg", "knn"}
    ranked = [r["val_balanced_accuracy"] for r in board.rows]
    assert ranked == sorted(ranked, reverse=True) and board.best() is board.rows[0]
    for row in board.rows:
        assert row["val_source"] == "15% of train, stratified, seed 0"
        assert 0.6 < row["test_accuracy"] <= 1 and 0.7 < row["test_roc_auc"] <= 1
        assert row["test_accuracy_ci"][0] <= row["test_accuracy"] <= row["test_accuracy_ci"][1]
        result = board.result_of(row)
        # the threshold comes from validation rows only
        assert row["threshold"] == choose_threshold(result.val_truth, result.val_proba[:, 1], "balanced_accuracy")
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["inputs"][0]["cache_key"] == emb.cache_key and len(run["inputs"][0]["sha256"]) == 64
    assert {r["head"] for r in run["results"]} == {"logreg", "knn"}
    assert run["results"][0]["test"]["confusion"] and run["config"]["threshold"] == "balanced_accuracy"
    for name in ("leaderboard.csv", "leaderboard.md", "leaderboard.json"):
        assert (tmp_path / "run" / name).stat().st_size > 100
    pngs = sorted((tmp_path / "run" / "plots").glob("*.png"))
    assert len(pngs) == 6 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert sorted(run["plots"]) == sorted(f"plots/{p.name}" for p in pngs)


def test_leaderboard_sorting_and_formats():
    rows = [{"backbone": "a", "head": "x", "val_balanced_accuracy": 0.7, "val_log_loss": 0.3},
            {"backbone": "b", "head": "y", "val_balanced_accuracy": 0.9, "val_log_loss": 0.5}]
    board = Leaderboard(rows)
    assert board.best()["backbone"] == "b"
    assert board.best("log_loss")["backbone"] == "a"
    assert board.to_markdown().splitlines()[0] == "| backbone | head | val_balanced_accuracy |"
    assert json.loads(board.to_json())[0]["head"] == "x"
    assert board.to_csv().splitlines()[0].startswith("backbone,head,")
    with pytest.raises(ConfigError, match="The 'sort_by' parameter"):
        board.sorted("speed")


def test_cli_train_and_compare(tmp_path):
    runner = CliRunner()
    trained = runner.invoke(main, ["train", str(FIXTURE), "--head", "logreg", "--out", str(tmp_path / "lr")])
    assert trained.exit_code == 0, trained.output
    assert "| efficientnet_lite0 | logreg |" in trained.output and "best by validation" in trained.output
    assert (tmp_path / "lr" / "run.json").exists()
    compared = runner.invoke(main, ["compare", str(FIXTURE), str(FIXTURE), "--heads", "knn,logreg", "--cv", "3",
                                    "--sort-by", "roc_auc"])
    assert compared.exit_code == 0, compared.output
    assert compared.output.count("| efficientnet_lite0 |") == 2  # the same file twice is compared once
    bad = runner.invoke(main, ["compare", str(FIXTURE), "--heads", "svn"])
    assert bad.exit_code == 2 and "unknown head 'svn'; did you mean svm" in bad.output


def copy_as(tmp_path, label: str, key: str) -> Path:
    """The fixture under another backbone label and cache key: a second file of the same images."""
    import shutil

    import h5py

    path = tmp_path / f"{label}.h5"
    shutil.copy(FIXTURE, path)
    with h5py.File(path, "r+") as handle:
        handle.attrs["label"], handle.attrs["cache_key"] = label, key
    return path


def test_concatenated_backbones_are_one_more_row(tmp_path):
    from featx.errors import DataError
    from featx.store.embeddings import concat_embeddings

    emb = load_embeddings(FIXTURE)
    other_path = copy_as(tmp_path, "other", "0123456789")
    both = concat_embeddings([emb, load_embeddings(other_path)])
    assert both.features("train").shape == (200, 2560) and both.label == "efficientnet_lite0+other"
    board = compare([FIXTURE, other_path], ["logreg"], concat=True)
    save_run(board, tmp_path / "run")
    assert {r["backbone"] for r in board.rows} == {"efficientnet_lite0", "other", "efficientnet_lite0+other"}
    assert len(board.rows) == 3
    other = load_embeddings(FIXTURE)
    other.paths = other.paths[::-1].copy()
    with pytest.raises(DataError, match="rows differ"):
        concat_embeddings([emb, other])


def noisy_copy(tmp_path, label: str, key: str, noise: float = 1.5) -> Path:
    """A second file of the fixture's images whose features tell the classes apart less well (another backbone)."""
    import h5py

    path = copy_as(tmp_path, label, key)
    with h5py.File(path, "r+") as handle:
        features = handle["features"][...].astype(np.float32)
        noisy = features + np.random.default_rng(0).normal(0, noise * features.std(), features.shape)
        handle["features"][...] = noisy.astype(handle["features"].dtype)
    return path


def test_ensemble_averages_each_head_over_the_files_in_logit_space(tmp_path):
    from featx.heads.registry import load_head, save_head
    from featx.store.embeddings import concat_embeddings

    other = noisy_copy(tmp_path, "noisy", "0123456789")
    board = compare([FIXTURE, other], ["logreg", "knn"], ensemble=True)
    assert len(board.rows) == 6
    averaged = {r["head"]: board.result_of(r) for r in board.rows
                if r["backbone"] == "efficientnet_lite0+noisy averaged"}
    assert set(averaged) == {"logreg", "knn"}
    for head, result in averaged.items():
        members = [board.result_of(r) for r in board.rows if r["head"] == head and r is not result.row]
        assert sorted(m.row["backbone"] for m in members) == ["efficientnet_lite0", "noisy"]
        for split in ("val", "test"):
            logits = [np.log(p[:, 1] / p[:, 0]) for p in (np.clip(getattr(m, f"{split}_proba"), 1e-7, None)
                                                           for m in members)]  # knn says 0 and 1: kept finite
            expected = 1 / (1 + np.exp(-np.mean(logits, axis=0)))
            assert np.allclose(getattr(result, f"{split}_proba")[:, 1], expected, atol=1e-6)
            assert not np.allclose(getattr(result, f"{split}_proba"), getattr(members[0], f"{split}_proba"), atol=1e-3)
        assert set(result.row["params"]) == {"efficientnet_lite0", "noisy"}

    assert board.settings["ensemble"] is True
    result = averaged["logreg"]  # saved as a run's best head is: it reads back and scores the same
    save_head(tmp_path / "alone" / "head.json", result.fitted, result.embeddings, result.row["threshold"])
    saved = load_head(tmp_path / "alone" / "head.json")
    both = concat_embeddings([load_embeddings(FIXTURE), load_embeddings(other)])
    test = both.rows("test")
    assert np.allclose(saved["pipeline"].predict_proba(both.features_at(test)), result.test_proba,
                       atol=1e-5)
    assert [m["cache_key"] for m in saved["embeddings_meta"]["part_meta"]] == [
        load_embeddings(FIXTURE).cache_key, "0123456789"]  # how each backbone made its part, for predict

    with pytest.raises(ConfigError, match="--ensemble needs at least two"):
        compare([FIXTURE], ["logreg"], ensemble=True)
    shown = CliRunner().invoke(main, ["compare", str(FIXTURE), str(other), "--heads", "logreg", "--ensemble",
                                      "--smooth-test", "5"])
    assert shown.exit_code == 0, shown.output
    assert "efficientnet_lite0+noisy averaged | logreg" in shown.output


@pytest.mark.slow  # eight files × an ensemble, ~6 s
def test_an_ensemble_of_many_long_named_files_saves_its_run(tmp_path):
    """Eight cache files' stems joined are longer than a file name may be; the run's files still get names."""
    files = [copy_as(tmp_path, f"efficientnet_lite0_ft-{i:08d}-{'a' * 10}", f"{i:010d}") for i in range(8)]
    board = compare(files, ["logreg"], ensemble=True)
    run = tmp_path / "run"
    save_run(board, run)
    averaged = [r for r in board.rows if r["backbone"].endswith(" averaged")]
    assert len(averaged) == 1 and averaged[0]["backbone"].count("+") == 7  # the label still names every member
    saved = [p.name for p in run.rglob("*") if p.is_file()]
    assert max(len(name.encode()) for name in saved) <= 255
    assert sum("+7-more-" in name for name in saved) >= 2  # the averaged head and its test predictions
    fewer = compare(files[:7], ["logreg"], ensemble=True)
    assert {r["file"] for r in fewer.rows if r["backbone"].endswith(" averaged")} != {averaged[0]["file"]}


def test_ensemble_members_may_differ_in_their_augmented_copies(tmp_path):
    from dataclasses import replace

    from featx.errors import DataError
    from featx.store.embeddings import AUGMENTED

    plain = load_embeddings(noisy_copy(tmp_path, "noisy", "0123456789"))
    train = plain.rows("train")[:20]
    copies = replace(plain, paths=np.concatenate([plain.paths, plain.paths[train]]),
                     splits=np.concatenate([plain.splits, np.full(len(train), AUGMENTED, dtype=plain.splits.dtype)]),
                     ok=np.concatenate([plain.ok, plain.ok[train]]),
                     errors=np.concatenate([plain.errors, plain.errors[train]]),
                     _features=np.concatenate([plain._features, plain._features[train] + 0.1]),
                     _labels=np.concatenate([plain._labels, plain._labels[train]]))
    board = compare([FIXTURE, copies], ["logreg"], ensemble=True)
    averaged = next(r for r in board.rows if r["backbone"].endswith("averaged"))
    assert board.splits[averaged["file"]].train.features.shape == (170, 2560)  # the images, without either file's copies
    other = replace(plain, paths=plain.paths[::-1].copy())
    with pytest.raises(DataError, match="rows differ"):
        compare([FIXTURE, other], ["logreg"], ensemble=True)
    unreadable = replace(plain, ok=plain.ok.copy())
    unreadable.ok[plain.rows("test")[0]] = False  # averaged row by row, every head must score the same images
    with pytest.raises(DataError, match="unreadable in another file"):
        compare([FIXTURE, unreadable], ["logreg"], ensemble=True)
    leaks = compare([FIXTURE, plain], ["logreg"], ensemble=True, exclude_leaked=True, duplicate_cosine=0.9).rows
    counts = {r["backbone"]: r["test_leaked_rows"] for r in leaks}
    assert counts["efficientnet_lite0+noisy averaged"] >= max(counts["efficientnet_lite0"], counts["noisy"]) > 0


def test_augmented_copies_train_the_heads_but_never_copies_of_validation_images(tmp_path, tiny_config):
    from dataclasses import replace

    from featx.comparison.evaluate import split_arrays
    from featx.embed.extraction import extract
    from tests.conftest import make_class_folders

    folder = make_class_folders(tmp_path / "xray", per_class=8, splits=("train", "test"))
    emb = load_embeddings(extract(folder, replace(tiny_config, augment=1, aug="xray"), progress=False).path)
    splits = split_arrays(emb, 0.25, seed=0)
    (X_train, y_train), y_val, source = (splits.train.features, splits.train.labels), splits.val.labels, splits.val_source
    assert source.startswith("25% of train") and len(y_val) == 6
    assert len(y_train) == 2 * (24 - 6)  # the 18 kept images and one copy of each
    all_copies = emb.augmented_copies(emb.paths_of("train"))[0]
    trained_on = {row.tobytes() for row in X_train}
    left_out = [row for row in all_copies if row.tobytes() not in trained_on]
    assert len(left_out) == 6  # exactly the validation images' copies stayed out
    X_plain = split_arrays(emb, 0.25, seed=0, with_copies=False).train.features
    assert len(X_plain) == 18


@pytest.mark.parametrize("n_classes, n_rows", [(2, 40), (3, 12), (5, 300)])
def test_bootstrap_aucs_equal_the_auc_of_each_resample(n_classes, n_rows):
    from featx.heads.metrics import _auc, bootstrap_aucs

    rng = np.random.default_rng(n_classes)
    y = rng.integers(0, n_classes, n_rows)
    proba = np.round(rng.random((n_rows, n_classes)), 1)  # coarse scores: many ties
    proba /= proba.sum(1, keepdims=True)
    index = rng.integers(0, n_rows, (100, n_rows))
    expected = np.array([_auc(y[i], proba[i]) for i in index])
    np.testing.assert_allclose(bootstrap_aucs(y, proba, index), expected, atol=1e-12)  # NaN where a class is missing
    assert n_rows > 20 or np.isnan(expected).any()


def test_heads_fitted_in_parallel_processes_give_the_sequential_leaderboard(monkeypatch):
    import featx.comparison.evaluate as evaluate

    emb = load_embeddings(FIXTURE)
    monkeypatch.setattr(evaluate, "PARALLEL_MIN_VALUES", 10**12)
    one_by_one = compare([emb], ["logreg", "svm", "lightgbm"])
    monkeypatch.setattr(evaluate, "PARALLEL_MIN_VALUES", 0)  # the fixture is small: parallel only when told
    parallel = compare([emb], ["logreg", "svm", "lightgbm"])
    timings = ("fit_s", "predict_s")
    assert ([{k: v for k, v in r.items() if k not in timings} for r in parallel.rows]
            == [{k: v for k, v in r.items() if k not in timings} for r in one_by_one.rows])
    for a, b in zip(parallel.results, one_by_one.results):
        assert np.array_equal(a.val_proba, b.val_proba) and np.array_equal(a.test_proba, b.test_proba)
