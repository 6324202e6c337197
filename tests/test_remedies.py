"""Remedies are registered steps, and a run folder is a contract: predict does what compare measured.

The matrix test runs every remedy, --concat, --ensemble, --tta-views, --adapt-bn and a combination of three
through compare → run folder → predict on the run's own test images, and checks the classes and probabilities
the leaderboard scored, within 1e-6. The toy-remedy test registers a remedy defined here, with no edit to featx.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from featx.comparison.evaluate import compare
from featx.comparison.runs import save_run
from featx.errors import ConfigError, DataError
from featx.heads.metrics import predict_labels
from featx.shift.remedies import REMEDIES, register_remedy
from featx.shift.remedy import Context, Fitted, Remedy
from featx.store.embeddings import load_embeddings
from featx.vocab import PARAMETERS, Interval
from tests.conftest import make_image

TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def binary_data(tmp_path_factory):
    """Two classes of noisy colours that overlap, with train, val and test images all different, and one test
    image a copy of a training image (a leak for --exclude-leaked to find). 36 test images: enough for the
    BatchNorm statistics of --adapt-bn (32)."""
    root = tmp_path_factory.mktemp("remedies") / "data"
    rng = np.random.default_rng(0)
    counts = {"train": 12, "val": 6, "test": 18}
    for s, (split, count) in enumerate(counts.items()):
        for c, name in enumerate(("a", "b")):
            for i in range(count):
                tone = rng.normal(0, 30, 3)
                colour = np.clip(np.array([150, 70, 110]) + (c * 2 - 1) * np.array([-25, 0, 25]) + tone, 0, 255)
                make_image(root / split / name / f"{name}_{i:02d}.jpg", tuple(colour), seed=1000 * s + 100 * c + i)
    shutil.copyfile(root / "train" / "a" / "a_00.jpg", root / "test" / "a" / "a_17.jpg")
    return root


@pytest.fixture(scope="module")
def extracted(binary_data, tmp_path_factory):
    """The embedding files the matrix compares: plain, a second recipe (for --concat / --ensemble), test-time
    views, and AdaBN. fp32, so that embedding a batch here and at predict gives the same numbers."""
    from featx.embed.extraction import ExtractConfig, extract

    cache = tmp_path_factory.mktemp("remedies-cache")
    base = ExtractConfig(backbone="resnet18", weights="none", image_size=32, batch_size=36, precision="fp32",
                         dtype="float32", cache_dir=str(cache))
    recipes = {"plain": base, "other": replace(base, image_size=40, fit="full"),
               "views": replace(base, tta_views=2, aug="xray"), "adabn": replace(base, adapt_bn=True)}
    return {name: extract(binary_data, config, progress=False).path for name, config in recipes.items()}


def predicted_like_the_leaderboard(board, run: Path, data: Path):
    """``featx predict``'s classes and probabilities for the best row's scored test images against the
    leaderboard's; returns the best row and the predictor."""
    from featx.use.predict import Predictor

    best = board.best()
    result = board.result_of(best)
    predictor = Predictor(run)
    predictor.open_set = None  # the leaderboard scores the head's classes; `unknown` is predict's own extra
    order = {p: i for i, p in enumerate(result.test_paths)}
    predicted = [r for r in predictor.predict([data / "test"], top_k=len(result.classes))
                 if Path(r.path).relative_to(data).as_posix() in order]
    assert len(predicted) == len(order)  # every scored test image, read
    rows = [order[Path(r.path).relative_to(data).as_posix()] for r in predicted]
    given = np.array([[dict(r.top_k)[c] for c in result.classes] for r in predicted])
    np.testing.assert_allclose(given, result.test_proba[rows], atol=TOLERANCE, rtol=0)
    expected = predict_labels(result.test_proba[rows], result.decision_threshold("test"))
    assert [r.prediction for r in predicted] == [result.classes[k] for k in expected]
    return best, predictor


CASES = {
    "plain": (["plain"], {}),
    "exclude_leaked": (["plain"], {"exclude_leaked": True, "duplicate_cosine": 0.999}),
    "align_standardize": (["plain"], {"align": "standardize"}),
    "align_coral": (["plain"], {"align": "coral"}),
    "prior_shift": (["plain"], {"prior_shift": "auto"}),
    "mixture_threshold": (["plain"], {"threshold": "mixture"}),
    "smooth_test": (["plain"], {"smooth_test": 5}),
    "concat": (["plain", "other"], {"concat": True}),
    "ensemble": (["plain", "other"], {"ensemble": True}),
    "tta_views": (["views"], {}),
    "adapt_bn": (["adabn"], {}),
    "ensemble_align_mixture": (["plain", "other"], {"ensemble": True, "align": "standardize", "threshold": "mixture"}),
}
JOINED = {"concat": "+", "ensemble": " averaged", "ensemble_align_mixture": " averaged"}


@pytest.mark.parametrize("case", CASES)
def test_predict_gives_the_test_predictions_the_leaderboard_scored(case, extracted, binary_data, tmp_path, caplog):
    files, options = CASES[case]
    board = compare([extracted[name] for name in files], ["logreg"], **options)
    if case in JOINED:  # the joined input's row as the run's best, so that predict replays it
        joined = next(r for r in board.rows if JOINED[case] in r["backbone"])
        board = replace(board, rows=[joined], results=[board.result_of(joined)])
    run = save_run(board, tmp_path / "run")
    with caplog.at_level("WARNING", logger="featx"):
        best, predictor = predicted_like_the_leaderboard(board, run, binary_data)
    recorded = json.loads((run / "run.json").read_text())
    steps = json.loads((run / "best" / "head.json").read_text())["remedies"]
    if case == "smooth_test":  # transductive: reproduced only because one call held exactly the test images
        assert best["not_reproducible_by_predict"] == "smooth_test"
        assert "not reproducible by predict (smooth_test: it spreads" in caplog.text
    else:
        assert "not_reproducible_by_predict" not in best and "not reproducible" not in caplog.text
    if case == "exclude_leaked":
        assert best["test_leaked_rows"] == 1 and board.result_of(best).test["n"] == 35
    if case in ("tta_views", "adapt_bn"):
        assert case in recorded["config"]["remedies"][best["file"]]
        made, plain = (load_embeddings(extracted[name]).features("test") for name in (files[0], "plain"))
        assert np.abs(made - plain).max() > 1e-2  # the views (the statistics) change the features predict must make
    if case in ("concat", "ensemble"):  # each image embedded by each backbone, as its file was made
        assert [b.preprocess.size for b in predictor.backbones] == [32, 40]
    if case == "ensemble_align_mixture":
        assert [s["name"] for s in steps] == ["align", "align", "mixture_threshold"]
        assert [s["columns"] for s in steps[:2]] == [[0, 512], [512, 1024]]
        assert recorded["results"][0]["remedies"]["mixture_threshold"]["method"] == "mixture"


class AddConstant(Remedy):
    """A toy remedy: every feature moved by a constant, train and test alike. A head's scaler takes a constant
    learnt on train back off, so a predict that forgot to add it would score new images as shifted."""

    name = parameter = "add_constant"

    def fit(self, value, context: Context) -> Fitted:
        return Fitted(self.name, replay={"constant": value}, record={"constant": value},
                      summary=f"every feature moved by {value}")

    def source(self, fitted, X):
        return X + fitted.replay["constant"]

    def target(self, replay, X):
        return X + replay["constant"]


@pytest.fixture
def toy_remedy():
    register_remedy(AddConstant(), constraint=Interval(float))
    yield
    REMEDIES.pop("add_constant")
    PARAMETERS.pop("add_constant")


def test_a_remedy_registered_outside_featx_runs_through_compare_the_run_predict_and_the_report(
        toy_remedy, extracted, binary_data, tmp_path):
    from featx.use.predict import Predictor
    from featx.use.report import write_report

    board = compare([extracted["plain"]], ["logreg"], add_constant=3.0)
    run = save_run(board, tmp_path / "run")
    recorded = json.loads((run / "run.json").read_text())
    assert recorded["config"]["add_constant"] == 3.0
    assert recorded["config"]["remedies"][board.best()["file"]]["add_constant"]["constant"] == 3.0
    assert json.loads((run / "best" / "head.json").read_text())["remedies"] == [
        {"name": "add_constant", "stage": "features", "replay": {"constant": 3.0}}]
    predicted_like_the_leaderboard(board, run, binary_data)
    # the constant matters: the same head without it scores the test images otherwise
    emb = load_embeddings(extracted["plain"])
    head = board.result_of(board.best()).fitted.pipeline
    assert np.abs(head.predict_proba(emb.features("test")) - head.predict_proba(emb.features("test") + 3.0)).max() > 1e-3
    assert "every feature moved by 3.0" in write_report(run).read_text()
    with pytest.raises(ConfigError, match="The 'add_constant' parameter of compare must be a float"):
        compare([extracted["plain"]], ["logreg"], add_constant="much")
    REMEDIES.pop("add_constant")  # a run whose remedy is not registered where it is used is refused
    try:
        with pytest.raises(DataError, match="used the remedy 'add_constant', which is not registered here"):
            Predictor(run)
    finally:
        register_remedy(AddConstant(), constraint=Interval(float), replace=True)


def test_the_registry_refuses_what_it_could_not_run():
    with pytest.raises(ConfigError, match="already registered"):
        register_remedy(REMEDIES["align"].__class__())

    class Nameless(Remedy):
        name = parameter = "undeclared_option"

    with pytest.raises(ConfigError, match="no constraint in featx.vocab.PARAMETERS"):
        register_remedy(Nameless())

    class Silent(Remedy):
        name, parameter, replayable = "silent", "align", False

    with pytest.raises(ConfigError, match="needs the reason"):
        register_remedy(Silent())
    with pytest.raises(ConfigError, match="compare has no option 'alignn'"):
        compare([], ["logreg"], alignn="coral")


def test_compare_names_no_remedy():
    """Remedies reach compare only through the registry: none of their names or options appear in its code."""
    import ast
    import inspect

    from featx.comparison import evaluate

    source = inspect.getsource(evaluate)
    nodes = list(ast.walk(ast.parse(source)))
    words = ({n.value for n in nodes if isinstance(n, ast.Constant) and isinstance(n.value, str)}
             | {n.id for n in nodes if isinstance(n, ast.Name)} | {n.attr for n in nodes if isinstance(n, ast.Attribute)})
    names = {r.name for r in REMEDIES.values()} | {r.parameter for r in REMEDIES.values()} | {"mixture", "leaked"}
    assert len(names) > 8 and not (names - {"threshold"}) & words  # the decision threshold is compare's own option
