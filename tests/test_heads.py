import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.utils.estimator_checks import check_estimator

from featx.errors import ConfigError, DataError
from featx.heads.registry import EarlyStoppedLightGBM, fit_head, get_head, list_heads, load_head, resolve_heads

FIXTURE = Path(__file__).parent / "fixtures" / "chest_xray_efficientnet_lite0.h5"


def test_lightgbm_head_follows_the_estimator_contract():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = check_estimator(EarlyStoppedLightGBM(max_trees=20), on_fail=None)
    failed = [(r["check_name"], str(r["exception"])[:200]) for r in results if r["status"] == "failed"]
    assert not failed
    assert sum(r["status"] == "passed" for r in results) >= 40


def test_registry_and_did_you_mean():
    assert list_heads() == ["logreg", "svm", "lightgbm", "knn", "mlp"]
    assert resolve_heads("all") == list_heads()
    assert resolve_heads("svm, logreg") == ["svm", "logreg"]
    with pytest.raises(ConfigError, match="unknown head 'lightgmb'; did you mean lightgbm"):
        get_head("lightgmb")


def blobs(n_per_class=60, n_classes=3, dim=20, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (n_classes, dim))
    X = np.concatenate([c + rng.normal(0, 1, (n_per_class, dim)) for c in centres]).astype(np.float32)
    y = np.repeat(np.arange(n_classes), n_per_class)
    return X, y


@pytest.mark.parametrize("name", ["logreg", "svm", "lightgbm", "knn", "mlp"])
def test_every_head_learns_separable_classes(name):
    X, y = blobs()
    Xv, yv = blobs(20, seed=0)
    fitted = fit_head(name, X, y, Xv[::3], yv[::3], seed=0)
    proba = fitted.pipeline.predict_proba(Xv)
    assert proba.shape == (60, 3) and np.allclose(proba.sum(1), 1, atol=1e-6)
    assert (proba.argmax(1) == yv).mean() > 0.9
    assert fitted.tuned_on == "validation split" and fitted.best_params and fitted.note


def test_cv_tuning_and_svm_kernel_choice_is_recorded():
    X, y = blobs(40)
    fitted = fit_head("svm", X, y, cv=3)
    assert fitted.tuned_on == "3-fold stratified CV on train" and "RBF kernel" in fitted.note
    plan = get_head("svm").plan(20_000, 1280, 0)
    assert "linear kernel (N=20000 > 10000" in plan.note
    with pytest.raises(DataError, match="the smallest class has 1 training row; at least 2 are needed"):
        fit_head("logreg", X[:41], y[:41], cv=3)


def test_saved_head_is_checked_against_the_embeddings(tmp_path):
    from featx.comparison.evaluate import compare
    from featx.comparison.runs import save_run
    from featx.store.embeddings import load_embeddings

    emb = load_embeddings(FIXTURE)
    board = compare([emb], ["logreg"])
    save_run(board, tmp_path / "run")
    path = tmp_path / "run" / board.rows[0]["model"]
    assert path.suffix == ".json" and path.with_suffix(".npz").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a safe head loads without any warning to silence
        head = load_head(path, expected_cache_key=emb.cache_key)
    assert head["classes"] == ["NORMAL", "PNEUMONIA"]
    np.testing.assert_allclose(head["pipeline"].predict_proba(emb.features("test")), board.results[0].test_proba)
    with pytest.raises(DataError, match="trained on embeddings .* not on other"):
        load_head(path, expected_cache_key="other")
    (tmp_path / "junk.json").write_text("nope")
    with pytest.raises(DataError, match="not a readable head file"):
        load_head(tmp_path / "junk.json")


@pytest.mark.parametrize("name", ["logreg", "svm", "lightgbm", "knn", "mlp"])
def test_every_head_round_trips_through_the_safe_format(tmp_path, name):
    from featx.heads.registry import save_head
    from featx.store.embeddings import load_embeddings

    emb = load_embeddings(FIXTURE)
    X, y = emb.features("train"), emb.labels("train")
    fitted = fit_head(name, X, y, X[::4], y[::4])
    path = save_head(tmp_path / f"{name}.json", fitted, emb)
    np.testing.assert_array_equal(load_head(path)["pipeline"].predict_proba(X), fitted.pipeline.predict_proba(X))


@pytest.mark.parametrize("planted", ["os.system", "builtins.eval", "subprocess.Popen", "tests.conftest.make_image"])
def test_a_head_file_naming_any_other_type_is_refused_before_anything_runs(tmp_path, planted):
    from featx.heads.registry import save_head
    from featx.store.embeddings import load_embeddings

    emb = load_embeddings(FIXTURE)
    path = save_head(tmp_path / "h.json", fit_head("logreg", emb.features("train"), emb.labels("train"), cv=3), emb)
    text = path.read_text().replace('"sklearn.preprocessing._data.StandardScaler"', f'"{planted}"')
    path.write_text(text)
    with pytest.raises(DataError, match=f"refused: it holds a {planted}, which is not a type a featx head holds"):
        load_head(path)
    from featx.heads import serialize

    with pytest.raises(DataError, match="cannot save a builtins.builtin_function_or_method: not a type a featx"):
        serialize.dump({"callback": print}, tmp_path / "bad.json", {})


def test_the_head_path_never_imports_torch(tmp_path):
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from featx.cli.commands import main\n"
        f"result = CliRunner().invoke(main, ['compare', r'{FIXTURE}', '--heads', 'logreg,knn', '--out', r'{tmp_path}'])\n"
        "assert result.exit_code == 0, result.output\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_fixed_parameters_leave_the_search_space():
    X, y = blobs(30)
    Xv, yv = blobs(10, seed=1)
    fitted = fit_head("logreg", X, y, Xv, yv, params={"clf__C": 0.5, "clf__class_weight": None})
    assert fitted.best_params == {} and fitted.pipeline["clf"].C == 0.5
    assert fitted.pipeline["clf"].class_weight is None and "fixed" in fitted.note
    with pytest.raises(ConfigError, match="head 'logreg': Invalid parameter"):
        fit_head("logreg", X, y, Xv, yv, params={"clf__gamma": 1})


def test_the_registry_refuses_a_taken_name_unless_told_to_replace():
    from featx.heads.registry import HEADS, register_head

    original = HEADS["knn"]
    with pytest.raises(ConfigError, match="a head named 'knn' is already registered; pass replace=True"):
        register_head("knn", "another knn")(original.plan)
    try:
        register_head("knn", "another knn", replace=True)(original.plan)
        assert get_head("knn").description == "another knn"
    finally:
        HEADS["knn"] = original


def test_a_warm_started_path_chooses_and_fits_as_independent_fits_do():
    from sklearn.model_selection import GridSearchCV, PredefinedSplit

    X, y = blobs(n_per_class=80, dim=30, seed=3)
    X += np.random.default_rng(3).normal(0, 3, X.shape).astype(np.float32)  # overlapping classes: C matters
    Xt, yt, Xv, yv = X[::2], y[::2], X[1::2], y[1::2]
    fitted = fit_head("logreg", Xt, yt, Xv, yv)
    plan = get_head("logreg").plan(len(Xt), X.shape[1], 0)
    cold = GridSearchCV(plan.pipeline, plan.grid, scoring="balanced_accuracy", refit=False,
                        cv=PredefinedSplit(np.r_[np.full(len(Xt), -1), np.zeros(len(Xv), int)]))
    cold.fit(np.concatenate([Xt, Xv]), np.concatenate([yt, yv]))
    assert fitted.best_params == cold.best_params_
    assert fitted.tuning_score == pytest.approx(cold.best_score_, abs=0.02)
    independent = plan.pipeline.set_params(**cold.best_params_).fit(Xt, yt)
    assert np.abs(fitted.pipeline.predict_proba(Xv) - independent.predict_proba(Xv)).max() < 1e-2  # solver tol
    assert fitted.pipeline["clf"].warm_start is False  # saved heads refit from scratch, as users expect


class SizeRecorder(EarlyStoppedLightGBM):
    """Predicts well exactly when ``num_leaves`` is 15; records how many rows each fit saw."""

    sizes: list[int] = []

    def fit(self, X, y):
        SizeRecorder.sizes.append(len(y))
        return super().fit(X, y if self.num_leaves == 15 else np.roll(y, 1))


def test_successive_halving_narrows_on_fractions_then_fits_the_best_on_every_row():
    from sklearn.metrics import get_scorer

    from featx.heads.registry import _halving_search

    X, y = blobs(n_per_class=90, n_classes=3, dim=8)
    SizeRecorder.sizes = []
    grid = [{"num_leaves": n} for n in (7, 15, 31, 3, 5, 9, 11, 13, 17)]
    kept = _halving_search(SizeRecorder(max_trees=10), grid, X, y, X, y, 0, get_scorer("balanced_accuracy"))
    assert kept == [{"num_leaves": 15}]
    assert SizeRecorder.sizes == [len(y) // 9] * 9 + [len(y) // 3] * 3


def test_successive_halving_caps_the_first_round(monkeypatch):
    from sklearn.metrics import get_scorer

    from featx.heads import registry as heads

    monkeypatch.setattr(heads, "HALVING_FIRST_ROWS", 20)
    X, y = blobs(n_per_class=90, n_classes=3, dim=8)
    SizeRecorder.sizes = []
    grid = [{"num_leaves": n} for n in (7, 15, 31, 3, 5, 9, 11, 13, 17)]
    heads._halving_search(SizeRecorder(max_trees=10), grid, X, y, X, y, 0, get_scorer("balanced_accuracy"))
    assert SizeRecorder.sizes == [20] * 9 + [60] * 3


def test_large_training_sets_get_the_sgd_linear_svm_and_halved_lightgbm(tmp_path, monkeypatch):
    from featx.heads import registry as heads
    from featx.heads import serialize

    monkeypatch.setattr(heads, "RBF_MAX_ROWS", 100)
    monkeypatch.setattr(heads, "HALVING_MIN_ROWS", 100)
    X, y = blobs(n_per_class=100, n_classes=3, dim=20)
    Xt, yt, Xv, yv = X[::2], y[::2], X[1::2], y[1::2]
    svm = fit_head("svm", Xt, yt, Xv, yv)
    assert isinstance(svm.pipeline["clf"].estimator, heads.HingeSGD) and "SGD" in svm.note
    assert (svm.pipeline.predict(Xv) == yv).mean() > 0.95
    serialize.dump(svm.pipeline, tmp_path / "svm.json", {})
    again = serialize.load(tmp_path / "svm.json")["object"]
    assert np.array_equal(again.predict_proba(Xv), svm.pipeline.predict_proba(Xv))
    lightgbm = fit_head("lightgbm", Xt, yt, Xv, yv)
    assert "successive halving" in lightgbm.note and (lightgbm.pipeline.predict(Xv) == yv).mean() > 0.95
    assert lightgbm.pipeline["clf"].sampling == "goss" and "GOSS" in lightgbm.note
    serialize.dump(lightgbm.pipeline, tmp_path / "lightgbm.json", {})
    again = serialize.load(tmp_path / "lightgbm.json")["object"]
    assert np.array_equal(again.predict_proba(Xv), lightgbm.pipeline.predict_proba(Xv))
    with pytest.raises(ConfigError, match="sampling"):
        heads.EarlyStoppedLightGBM(sampling="gos").fit(Xt, yt)


def test_lightgbm_is_loaded_with_passive_openmp_threads_and_the_environment_is_left_as_it_was():
    import os
    import subprocess
    import sys

    probe = ("import builtins, os\n"
             "seen, original = {}, builtins.__import__\n"
             "def spy(name, *args, **kwargs):\n"
             "    if name == 'lightgbm': seen.setdefault('policy', os.environ.get('OMP_WAIT_POLICY'))\n"
             "    return original(name, *args, **kwargs)\n"
             "builtins.__import__ = spy\n"
             "from featx.heads.registry import import_lightgbm\n"
             "import_lightgbm()\n"
             "print(seen.get('policy'), os.environ.get('OMP_WAIT_POLICY'))\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    shown = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    assert shown.stdout.split() == ["PASSIVE", "None"]
    chosen = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                            env={**env, "OMP_WAIT_POLICY": "ACTIVE"})
    assert chosen.stdout.split() == ["ACTIVE", "ACTIVE"]
