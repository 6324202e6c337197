import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from featx.cli.commands import main
from featx.comparison.evaluate import compare
from featx.comparison.runs import save_run
from featx.embed.extraction import extract
from featx.heads.openset import OpenSet
from featx.use.predict import Predictor
from featx.store.embeddings import load_embeddings
from tests.conftest import make_class_folders, make_image


def copy_of(run, tmp_path):
    import shutil

    return shutil.copytree(run, tmp_path / "run")


def test_top_k_probabilities_in_order_and_bad_files_reported(tiny_run, tmp_path):
    data, _, run, _ = tiny_run
    folder = tmp_path / "new"
    for i, colour in enumerate([(200, 30, 30), (30, 180, 40), (30, 40, 200)]):
        make_image(folder / f"img{i}.png", colour, seed=500 + i, fmt="PNG")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    predictor = Predictor(run)
    results = predictor.predict([folder], top_k=2)
    assert [r.path.split("/")[-1] for r in results] == ["broken.jpg", "img0.png", "img1.png", "img2.png"]
    broken, *good = results
    assert broken.error.startswith("not an image") and broken.prediction is None
    for r in good:
        probabilities = [p for _, p in r.top_k]
        assert len(r.top_k) == 2 and probabilities == sorted(probabilities, reverse=True)
        assert 0.5 < sum(probabilities) <= 1 + 1e-6
        assert r.prediction in {"red", "green", "blue", "unknown"} and r.unknown_score is not None
    # the known colours are recognised
    assert [r.top_k[0][0] for r in good] == ["red", "green", "blue"]


def test_predictions_as_a_dataframe_hold_every_class_probability(tiny_run, tmp_path):
    data, _, run, _ = tiny_run
    good = make_image(tmp_path / "new" / "red.png", (200, 30, 30), seed=9, fmt="PNG")
    (tmp_path / "new" / "broken.jpg").write_bytes(b"not an image")
    predictor = Predictor(run)
    frame = predictor.predict_frame([tmp_path / "new"])
    assert list(frame.columns) == ["path", "prediction", "unknown_score", "error", *predictor.classes]
    broken, red = frame.iloc[0], frame.iloc[1]
    assert broken.error and np.isnan(broken[predictor.classes].astype(float)).all()
    assert red.path == str(good) and abs(red[predictor.classes].astype(float).sum() - 1) < 1e-5
    assert red[predictor.classes].astype(float).idxmax() == predictor.predict([good], top_k=1)[0].top_k[0][0]


def test_cli_json_and_csv(tiny_run, tmp_path):
    data, _, run, _ = tiny_run
    image = next((data / "test" / "red").glob("*.jpg"))
    result = CliRunner().invoke(main, ["predict", str(run / "best"), str(image), "--top-k", "3", "--json",
                                       "--csv", str(tmp_path / "p.csv")])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    assert set(answer[0]) == {"path", "prediction", "top_k", "unknown_score", "error"}
    assert [t["class"] for t in answer[0]["top_k"]][0] == "red" and len(answer[0]["top_k"]) == 3
    assert sum(t["probability"] for t in answer[0]["top_k"]) == pytest.approx(1, abs=1e-6)
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0].startswith("path,prediction,unknown_score,error,class_1,probability_1") and len(lines) == 2
    missing = CliRunner().invoke(main, ["predict", str(run), str(tmp_path / "nothing.jpg")])
    assert missing.exit_code == 2 and "no such file or folder" in missing.output


def test_unknown_threshold_meets_its_coverage_and_rejects_far_inputs():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (3, 64)) * 3 + 10
    def draw(n):
        y = rng.integers(0, 3, n)
        return np.abs(centres[y] + rng.normal(0, 1, (n, 64))), y
    X_train, y_train = draw(600)
    X_val, _ = draw(400)
    proba_val = np.full((400, 3), 1 / 3)
    open_set = OpenSet.calibrate(X_train, y_train, X_val, proba_val, coverage=0.95)
    for name, scores in open_set.scores(X_val, proba_val).items():
        assert (scores <= open_set.thresholds[name]).mean() >= 0.95
    X_new, _ = draw(300)
    far = np.abs(rng.normal(0, 1, (300, 64)) * 3 + 10)  # same scale, no class structure
    for name in ("knn", "centroid"):
        accepted_in = (open_set.scores(X_new, np.full((300, 3), 1 / 3))[name] <= open_set.thresholds[name]).mean()
        accepted_far = (open_set.scores(far, np.full((300, 3), 1 / 3))[name] <= open_set.thresholds[name]).mean()
        assert accepted_in > 0.85 and accepted_far < 0.2, name


def test_predict_refuses_weights_that_changed(tiny_run, tmp_path):
    data, _, run, _ = tiny_run
    run = copy_of(run, tmp_path)
    sidecar = json.loads((run / "best" / "head.json").read_text())
    sidecar["embeddings_meta"]["weights_sha256"] = "0" * 64
    (run / "best" / "head.json").write_text(json.dumps(sidecar))
    result = CliRunner().invoke(main, ["predict", str(run), str(next(data.rglob("*.jpg")))])
    assert result.exit_code == 2 and "re-extract and retrain" in result.output


def test_predictor_preprocesses_as_the_embeddings_were_made(tmp_path, tiny_config):
    from dataclasses import replace

    data = make_class_folders(tmp_path / "colours", per_class=6, splits=("train", "val", "test"))
    emb = load_embeddings(extract(data, replace(tiny_config, fit="full"), progress=False).path)
    save_run(compare([emb], ["logreg"]), tmp_path / "run")
    predictor = Predictor(tmp_path / "run")
    assert [(b.preprocess.fit, b.preprocess.size) for b in predictor.backbones] == [("full", 64)]


def test_predict_silences_only_its_own_unsafe_file_warning(tiny_run, monkeypatch):
    """A head pickled under another scikit-learn must still say so; only featx's own warning is hushed."""
    import warnings

    from sklearn.exceptions import InconsistentVersionWarning

    import featx.use.predict

    data, _, run, _ = tiny_run
    original = featx.use.predict.load_head

    def load_head_made_elsewhere(path, **options):
        warnings.warn(InconsistentVersionWarning(estimator_name="LogisticRegression", current_sklearn_version="1.9",
                                                 original_sklearn_version="0.24"), stacklevel=2)
        return original(path, **options)

    monkeypatch.setattr(featx.use.predict, "load_head", load_head_made_elsewhere)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = CliRunner().invoke(main, ["predict", str(run), str(next((data / "test" / "red").glob("*.jpg")))])
    assert result.exit_code == 0, result.output
    shown = [w.category for w in caught]
    assert InconsistentVersionWarning in shown
    assert not any("joblib files are code" in str(w.message) for w in caught)


PLANTED = textwrap.dedent("""
    import os, pickle, sys

    class Payload:
        def __reduce__(self):  # what a replaced head.joblib can do the moment it is unpickled
            return (os.system, ("touch " + sys.argv[2],))

    with open(sys.argv[1], "wb") as handle:
        pickle.dump(Payload(), handle)
""")


def test_a_planted_joblib_head_never_runs_without_trust(tiny_run, tmp_path):
    data, _, run, _ = tiny_run
    run = copy_of(run, tmp_path)
    for name in ("head.json", "head.npz"):
        (run / "best" / name).unlink()
    marker = tmp_path / "code-ran"
    subprocess.run([sys.executable, "-c", PLANTED, str(run / "best" / "head.joblib"), str(marker)], check=True)
    image = str(next((data / "test" / "red").glob("*.jpg")))
    refused = CliRunner().invoke(main, ["predict", str(run), image])
    assert refused.exit_code == 2 and "a joblib head runs code when it is loaded" in refused.output
    assert "--trust" in refused.output and not marker.exists()
    trusted = CliRunner().invoke(main, ["predict", str(run), image, "--trust"])
    assert marker.exists()  # with --trust it is the user's call, and featx said what it means:
    assert "featx: warning:" in trusted.output and "can run any code it holds" in trusted.output


def test_predict_checks_the_batch_for_drift_from_the_training_images(tiny_run, tmp_path):
    from PIL import Image

    predictor = Predictor(tiny_run.run)
    predictor.predict([tiny_run.data / "test"])
    alike = predictor.drift()
    assert alike is not None and alike.n == 30 and not alike.shifted
    for i in range(30):  # another kind of picture: stripes, none of the training colours
        stripes = np.zeros((40, 48, 3), np.uint8)
        stripes[::4] = 255
        stripes[:, i % 5::7, i % 3] = 120
        Image.fromarray(stripes).save(tmp_path / f"s{i:02d}.png")
    predictor.predict([tmp_path])
    assert predictor.drift().shifted
    result = CliRunner().invoke(main, ["predict", str(tiny_run.run), str(tmp_path)])
    assert result.exit_code == 0 and "differ from the ones the head was trained on" in result.output


def test_an_adapt_bn_run_embeds_new_images_with_their_own_statistics(tmp_path):
    from dataclasses import replace

    from featx.errors import ConfigError, DataError
    from featx.embed.extraction import ExtractConfig

    data = make_class_folders(tmp_path / "colours", per_class=12, splits=("train", "val", "test"))
    config = ExtractConfig(backbone="resnet18", weights="none", image_size=64, batch_size=4, adapt_bn=True,
                           cache_dir=str(tmp_path / "cache"))
    adapted = load_embeddings(extract(data, config, progress=False).path)
    save_run(compare([adapted], ["logreg"]), tmp_path / "run")
    # The test folder's images give the test split's features: statistics estimated as the extraction did
    predictor = Predictor(tmp_path / "run")
    predicted = predictor.predict([data / "test"])
    _, again, _ = predictor.features([data / p for p in adapted.paths_of("test")])
    np.testing.assert_allclose(again, adapted.features("test"), rtol=2e-3, atol=2e-3)
    assert [r.prediction for r in predicted] != [None] * len(predicted)
    # Three images cannot stand for a domain; a named folder of the same domain can
    few = sorted((data / "test" / "red").glob("*.jpg"))[:3]
    with pytest.raises(DataError, match="at least 32 readable ones, 3 given"):
        Predictor(tmp_path / "run").predict(few)
    named = Predictor(tmp_path / "run", adapt_to=[data / "test"])
    alone, among_all = named.predict(few), [r for r in predicted if Path(r.path) in set(few)]
    # the same statistics, so the same ranking; in bf16 (AMX CPUs) a batch of 3 rounds the last bits otherwise
    assert [[c for c, _ in r.top_k] for r in alone] == [[c for c, _ in r.top_k] for r in among_all]
    np.testing.assert_allclose([[p for _, p in r.top_k] for r in alone],
                               [[p for _, p in r.top_k] for r in among_all], atol=1e-5)
    plain_run = tmp_path / "plain"
    save_run(compare([extract(data, replace(config, adapt_bn=False), progress=False).path], ["logreg"]), plain_run)
    with pytest.raises(ConfigError, match="for runs extracted with --adapt-bn"):
        Predictor(plain_run, adapt_to=[data / "test"])
    shown = CliRunner().invoke(main, ["predict", str(tmp_path / "run"), *map(str, few), "--adapt-to",
                                      str(data / "test")])
    assert shown.exit_code == 0 and len(shown.output.splitlines()) == 4 and "red_02.jpg  red" in shown.output
    refused = CliRunner().invoke(main, ["predict", str(tmp_path / "run"), *map(str, few)])
    assert refused.exit_code == 2 and "name a folder of them with --adapt-to" in refused.output


def test_a_run_compared_with_smooth_test_spreads_each_predict_calls_scores_over_its_own_images(tiny_run, tmp_path,
                                                                                              caplog):
    from featx.shift.smooth_test import smooth_over_neighbours

    save_run(compare([tiny_run.embeddings], ["logreg"], smooth_test=5), tmp_path / "run")
    predictor = Predictor(tmp_path / "run")
    predicted = predictor.predict([tiny_run.data / "test"], top_k=3)
    _, features, _ = predictor.features([Path(r.path) for r in predicted])
    raw = predictor.head["pipeline"].predict_proba(features)
    given = np.array([[dict(r.top_k)[c] for c in predictor.classes] for r in predicted])
    np.testing.assert_allclose(given, smooth_over_neighbours(features, raw, 5), rtol=1e-6)
    assert not np.allclose(given, raw)
    few = sorted((tiny_run.data / "test" / "red").glob("*.jpg"))[:3]
    with caplog.at_level("WARNING", logger="featx"):
        alone = predictor.predict(few, top_k=3)
    assert "3 images have too few to spread over" in caplog.text
    _, features, _ = predictor.features(few)
    np.testing.assert_allclose([[dict(r.top_k)[c] for c in predictor.classes] for r in alone],
                               predictor.head["pipeline"].predict_proba(features), rtol=1e-6)


def test_new_images_are_embedded_in_the_precision_the_extraction_recorded(tiny_run, tmp_path, monkeypatch):
    """A bf16 extraction (a dense backbone on an AMX CPU) is predicted in bf16 too: fp32 features of the same
    images are another domain to the drift check (AUC 1.0 on this run before predict followed the record)."""
    from dataclasses import replace

    monkeypatch.setattr("featx.embed.hardware.cpu_has_bf16", lambda: True)  # bf16 is emulated where it is not native
    config = replace(tiny_run.config, precision="bf16", cache_dir=str(tmp_path / "cache"))
    embeddings = load_embeddings(extract(tiny_run.data, config, progress=False).path)
    assert embeddings.meta["precision"] == "bf16"
    save_run(compare([embeddings], ["logreg"]), tmp_path / "run")
    predictor = Predictor(tmp_path / "run")
    test_paths = [tiny_run.data / p for p in embeddings.paths_of("test")]
    _, features, _ = predictor.features(test_paths)
    assert predictor.backbones[0].precision == "bf16"
    np.testing.assert_allclose(features, embeddings.features("test"), rtol=1e-2, atol=1e-2)
    fp32 = load_embeddings(extract(tiny_run.data, replace(config, precision="fp32"), progress=False).path).features("test")
    assert np.abs(features - embeddings.features("test")).max() < np.abs(fp32 - embeddings.features("test")).max()
    predictor.predict(test_paths)
    assert not predictor.drift().shifted
