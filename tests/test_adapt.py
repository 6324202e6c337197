"""Adapting to shift without test labels: feature alignment, prior shift, transductive scoring (spreading over
neighbours, the mixture threshold), and compare's leak exclusion."""

import inspect
import json

import numpy as np
import pytest
from click.testing import CliRunner
from scipy.special import expit
from sklearn.metrics import roc_auc_score

from featx.shift.align import fit_alignment
from featx.shift.mixture_threshold import mixture_threshold, target_threshold
from featx.shift.prior_shift import em_priors, estimate_prior_shift as prior_shift, reweight
from featx.shift.smooth_test import smooth_over_neighbours
from featx.errors import DataError
from featx.heads.metrics import choose_threshold


def correlated(rng, n, dim=16, scale=1.0, offset=0.0):
    mixing = rng.normal(0, 1, (dim, dim))
    return rng.normal(0, 1, (n, dim)) @ mixing * scale + offset


def test_coral_gives_the_source_the_target_covariance_and_standardize_its_moments():
    rng = np.random.default_rng(0)
    source, target = correlated(rng, 4000), correlated(rng, 4000, scale=0.5, offset=2.0)
    coral = fit_alignment(source, target, "coral", regularisation=1e-9).apply(source)
    before = np.linalg.norm(np.cov(source, rowvar=False) - np.cov(target, rowvar=False))
    after = np.linalg.norm(np.cov(coral, rowvar=False) - np.cov(target, rowvar=False))
    assert after < 1e-3 * before
    assert np.allclose(coral.mean(0), target.mean(0), atol=1e-3)
    moments = fit_alignment(source, target, "standardize").apply(source)
    assert np.allclose(moments.mean(0), target.mean(0), atol=1e-3)
    assert np.allclose(moments.std(0), target.std(0), rtol=1e-3)
    with pytest.raises(DataError, match="at least 10"):
        fit_alignment(source, target[:5], "coral")


def test_coral_warns_when_the_target_has_fewer_images_than_dimensions(caplog):
    rng = np.random.default_rng(8)
    with caplog.at_level("WARNING", logger="featx"):
        fit_alignment(correlated(rng, 400), correlated(rng, 400), "coral")
    assert "fewer than its dimensions" not in caplog.text
    with caplog.at_level("WARNING", logger="featx"):
        fit_alignment(correlated(rng, 400, dim=64), correlated(rng, 40, dim=64), "coral")
    assert "from 40 target images, fewer than its dimensions" in caplog.text


def two_gaussians(rng, n, prior_of_1):
    """Rows of two classes (means -1 and +1, unit variance) and their exact posteriors under a 50/50 prior."""
    y = (rng.random(n) < prior_of_1).astype(int)
    x = rng.normal(2.0 * y - 1.0, 1.0)
    p1 = 1 / (1 + np.exp(-2 * x))
    return np.c_[1 - p1, p1], y


def test_em_recovers_a_changed_class_balance_and_reweighting_makes_the_right_calls():
    rng = np.random.default_rng(1)
    p_target, y_target = two_gaussians(rng, 5000, prior_of_1=0.2)
    estimate = em_priors(p_target, np.array([0.5, 0.5]))
    assert abs(estimate[1] - 0.2) < 0.03
    adjusted = reweight(p_target, np.array([0.5, 0.5]), estimate)
    assert (adjusted.argmax(1) == y_target).mean() > (p_target.argmax(1) == y_target).mean()
    p_val, y_val = two_gaussians(rng, 2000, prior_of_1=0.5)
    assert "y_target" not in inspect.signature(prior_shift).parameters  # the decision never sees test labels
    changed = prior_shift(p_val, y_val, p_target)
    assert changed.applied and abs(changed.target[1] - 0.2) < 0.03 and abs(changed.source[1] - 0.5) < 0.03
    same = prior_shift(p_val, y_val, two_gaussians(rng, 5000, prior_of_1=0.5)[0])
    assert abs(same.target[1] - 0.5) < 0.03


def write_file(tmp_path, features, labels, splits, name="e.h5"):
    from featx.store.embeddings import EmbeddingWriter

    n = len(labels)
    writer = EmbeddingWriter(tmp_path / name, dim=features.shape[1], paths=[f"{i}.jpg" for i in range(n)],
                             labels=list(labels), splits=list(splits),
                             attrs={"backbone": "test", "cache_key": name, "classes": ["a", "b"]})
    writer.write(features.astype(np.float16), np.ones(n, bool), [""] * n)
    return writer.finish()


def blobs(rng, n, dim=32, shift=0.0, contrast=1.0, separation=1.2):
    y = np.arange(n) % 2
    centres = np.random.default_rng(7).normal(0, 1, (2, dim)) * separation
    return (centres[y] + rng.normal(0, 1, (n, dim))) * contrast + shift, y


def replayed_like_the_leaderboard(board, file, out):
    """The run's best head, loaded as predict loads it, replays its remedies on the test features: the leaderboard's
    probabilities and decisions (the images behind this file are made up, so the features are given)."""
    from featx.comparison.runs import save_run
    from featx.heads.metrics import predict_labels
    from featx.heads.registry import load_head
    from featx.store.embeddings import load_embeddings
    from featx.use.predict import head_probabilities

    save_run(board, out)
    result = board.result_of(board.best())
    _, proba, threshold = head_probabilities(load_head(out / "best" / "head.json"), load_embeddings(file).features("test"))
    np.testing.assert_allclose(proba, result.test_proba, atol=1e-6, rtol=0)
    assert threshold == result.decision_threshold("test")
    assert np.array_equal(predict_labels(proba, threshold), predict_labels(result.test_proba, threshold))


def test_compare_excludes_test_images_leaked_from_train_and_reports_both_figures(tmp_path):
    from featx.comparison.evaluate import compare

    rng = np.random.default_rng(2)
    X_train, y_train = blobs(rng, 300, separation=0.25)  # classes that overlap: test accuracy well below 1
    X_test, y_test = blobs(rng, 100, separation=0.25)
    X_test[:12], y_test[:12] = X_train[:12] * 1.01, y_train[:12]  # twelve re-encoded training images in test
    file = write_file(tmp_path, np.r_[X_train, X_test], np.r_[y_train, y_test], ["train"] * 300 + ["test"] * 100)
    board = compare([file], ["logreg"], exclude_leaked=True, duplicate_cosine=0.98)
    row = board.rows[0]
    assert row["test_leaked_rows"] == 12 and board.settings["remedies"]["e.h5"]["exclude_leaked"]["test_rows"] == 12
    result = board.result_of(row)
    assert result.test["n"] == 88 and len(result.test_paths) == 88 and not {f"{300 + i}.jpg" for i in range(12)} & set(result.test_paths)
    assert row["test_with_leaked_accuracy"] != row["test_accuracy"]
    plain = compare([file], ["logreg"]).rows[0]
    assert plain["test_accuracy"] == row["test_with_leaked_accuracy"] and "test_leaked_rows" not in plain


def test_compare_aligns_train_to_the_test_images(tmp_path):
    from featx.cli.commands import main

    rng = np.random.default_rng(3)
    X_train, y_train = blobs(rng, 400)
    X_test, y_test = blobs(rng, 200, shift=1.5, contrast=0.6)  # another scanner: brighter, less contrast
    file = write_file(tmp_path, np.r_[X_train, X_test], np.r_[y_train, y_test], ["train"] * 400 + ["test"] * 200)
    runs = {}
    for align in ("none", "coral"):
        out = tmp_path / f"run-{align}"
        result = CliRunner().invoke(main, ["compare", str(file), "--heads", "logreg", "--align", align,
                                           "--out", str(out)])
        assert result.exit_code == 0, result.output
        runs[align] = json.loads((out / "run.json").read_text())
    aligned = runs["coral"]["config"]
    assert aligned["remedies"]["e.h5"]["align"]["method"] == "coral"
    assert aligned["remedies"]["e.h5"]["align"]["shift_auc_after"] < 0.7 < aligned["shift"]["e.h5"]["tests"]["overall"]["auc"]
    assert runs["coral"]["results"][0]["test_accuracy"] > runs["none"]["results"][0]["test_accuracy"] + 0.2
    refused = CliRunner().invoke(main, ["compare", str(file), "--align", "sideways"])
    assert refused.exit_code == 2 and "sideways" in refused.output


def test_compare_estimates_the_test_images_class_balance_and_reweights_only_when_asked(tmp_path):
    from featx.comparison.evaluate import compare

    rng = np.random.default_rng(4)
    X_train, y_train = blobs(rng, 2000, separation=0.25)
    X_test, y_test = blobs(rng, 600, separation=0.25)
    keep = (y_test == 0) | (np.arange(600) % 6 == 1)  # a quarter of the test images are b, against half in train
    file = write_file(tmp_path, np.r_[X_train, X_test[keep]], np.r_[y_train, y_test[keep]],
                      ["train"] * 2000 + ["test"] * int(keep.sum()))
    plain = compare([file], ["logreg"]).rows[0]
    estimated = compare([file], ["logreg"], prior_shift="estimate").rows[0]
    assert abs(estimated["remedies"]["prior_shift"]["target"]["b"] - 0.25) < 0.08
    assert not estimated["remedies"]["prior_shift"]["applied"]
    assert estimated["test_accuracy"] == plain["test_accuracy"]  # reported, not applied
    board = compare([file], ["logreg"], prior_shift="auto")
    auto = board.rows[0]
    assert auto["remedies"]["prior_shift"]["applied"] and auto["test_log_loss"] < plain["test_log_loss"]
    replayed_like_the_leaderboard(board, file, tmp_path / "run")
    assert auto["remedies"]["prior_shift"]["shift_after_reweighting_train"]["auc"] < 0.6  # the balance explains the shift

    X_other = X_test[keep] + 1.0  # the same balance change, and images unlike the training ones besides
    other = write_file(tmp_path, np.r_[X_train, X_other], np.r_[y_train, y_test[keep]],
                       ["train"] * 2000 + ["test"] * int(keep.sum()), name="other.h5")
    refused = compare([other], ["logreg"], prior_shift="auto").rows[0]
    assert not refused["remedies"]["prior_shift"]["applied"]  # EM assumes the images of a class did not change
    assert refused["remedies"]["prior_shift"]["shift_after_reweighting_train"]["auc"] > 0.6


def test_spreading_over_neighbours_mends_noisy_scores_of_clustered_images():
    rng = np.random.default_rng(6)
    X, y = blobs(rng, 400)  # two clusters of images
    p_b = np.clip(0.5 + (y - 0.5) * 0.3 + rng.normal(0, 0.3, 400), 0.01, 0.99)  # a head that is often wrong
    proba = np.c_[1 - p_b, p_b]
    spread = smooth_over_neighbours(X, proba, 10)
    assert np.allclose(spread.sum(1), 1.0)
    assert roc_auc_score(y, spread[:, 1]) > roc_auc_score(y, p_b) + 0.1
    assert np.array_equal(smooth_over_neighbours(X[:1], proba[:1], 10), proba[:1])  # no neighbours: as it was


def logit_scores(rng, n, shift=0.0, positives=0.7):
    """Probabilities of a head whose logits part into two groups (±3, unit spread), moved by ``shift``."""
    y = (rng.random(n) < positives).astype(int)
    p = expit(rng.normal(np.where(y == 1, 3.0, -3.0) + shift, 1.0))
    return np.c_[1 - p, p], y


def test_the_mixture_threshold_follows_target_scores_that_moved_and_is_kept_only_where_validation_agrees():
    rng = np.random.default_rng(5)
    p_val, y_val = logit_scores(rng, 600)
    p_target, y_target = logit_scores(rng, 600, shift=2.5)  # every target image reads more positive
    val_threshold = choose_threshold(y_val, p_val[:, 1], "balanced_accuracy")
    assert choose_threshold(y_val, p_val[:, 1], "mixture") == val_threshold  # validation's part of the rule
    assert "y_target" not in inspect.signature(target_threshold).parameters  # the decision never sees test labels
    found = target_threshold(p_val, y_val, val_threshold, p_target)
    assert found["applied"] and found["validation_cost"] <= 0.02
    accuracy = {t: ((p_target[:, 1] >= t) == y_target).mean() for t in (val_threshold, found["value"])}
    assert accuracy[found["value"]] > accuracy[val_threshold] + 0.05
    assert abs(found["target_positive_share"] - y_target.mean()) < 0.03

    # A head whose positive scores form two groups of their own: the mixture would cut between those.
    y_peaky = (rng.random(600) < 0.85).astype(int)
    logits = np.where(y_peaky == 1, np.where(rng.random(600) < 0.5, 2.0, 7.0), -2.0) + rng.normal(0, 0.7, 600)
    p_peaky = np.c_[1 - expit(logits), expit(logits)]
    peaky_threshold = choose_threshold(y_peaky, p_peaky[:, 1], "balanced_accuracy")
    refused = target_threshold(p_peaky, y_peaky, peaky_threshold, p_target)
    assert not refused["applied"] and refused["value"] == peaky_threshold and refused["validation_cost"] > 0.1
    assert mixture_threshold(p_val[:5, 1]) is None  # too few images to say where they part


def test_compare_scores_test_with_its_own_threshold_and_spread_scores_and_never_reads_test_labels(tmp_path):
    from featx.cli.commands import main
    from featx.comparison.evaluate import compare
    from featx.heads.registry import load_head
    from featx.store.embeddings import load_embeddings

    rng = np.random.default_rng(8)
    X_train, y_train = blobs(rng, 2000, separation=0.35)
    X_test, y_test = blobs(rng, 200, separation=0.35)
    centres = np.random.default_rng(7).normal(0, 1, (2, 32)) * 0.35
    X_test += 0.8 * (centres[1] - centres[0])  # the test images all look more like b
    file = write_file(tmp_path, np.r_[X_train, X_test], np.r_[y_train, y_test], ["train"] * 2000 + ["test"] * 200)
    board = compare([file], ["logreg"], threshold="balanced_accuracy")
    plain = board.rows[0]
    mixed = compare([file], ["logreg"], threshold="mixture")
    mixture = mixed.rows[0]
    replayed_like_the_leaderboard(mixed, file, tmp_path / "mixed")
    assert mixture["remedies"]["mixture_threshold"]["applied"] and mixture["threshold"] == plain["threshold"]
    assert mixture["test_accuracy"] > plain["test_accuracy"] + 0.2
    assert mixture["val_balanced_accuracy"] == plain["val_balanced_accuracy"]  # validation keeps its own threshold
    spread = compare([file], ["logreg"], threshold="mixture", smooth_test=10)
    assert spread.settings["smooth_test"] == 10 and spread.rows[0]["not_reproducible_by_predict"] == "smooth_test"
    emb = load_embeddings(file)
    assert np.allclose(spread.results[0].test_proba,
                       smooth_over_neighbours(emb.features("test"), board.results[0].test_proba, 10))

    shuffled = emb.labels_at().copy()
    shuffled[emb.rows("test")] = rng.permutation(shuffled[emb.rows("test")])
    blind = compare([emb.with_labels(shuffled)], ["logreg"], threshold="mixture", smooth_test=10).rows[0]
    seen = spread.rows[0]
    assert blind["remedies"] == seen["remedies"] and blind["threshold"] == seen["threshold"]

    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["compare", str(file), "--heads", "logreg", "--threshold", "mixture",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    row = json.loads((out / "run.json").read_text())["results"][0]
    assert row["remedies"]["mixture_threshold"]["applied"]
    assert load_head(out / row["model"], trust=True)["threshold"] == row["remedies"]["mixture_threshold"]["value"]
    refused = CliRunner().invoke(main, ["compare", str(file), "--smooth-test", "-1"])
    assert refused.exit_code == 2 and "smooth-test" in refused.output
