"""``featx export RUN --onnx``: every head through onnxruntime against featx predict, the README's example with
only onnxruntime, Pillow and numpy, and what cannot be exported refused with the reason."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("skl2onnx")  # in the test extra, as in [export]
onnxruntime = pytest.importorskip("onnxruntime")

from featx.cli.commands import main  # noqa: E402
from featx.comparison.evaluate import compare  # noqa: E402
from featx.comparison.runs import head_files, save_run  # noqa: E402
from featx.data.images import Preprocess, load_image  # noqa: E402
from featx.errors import DataError  # noqa: E402
from featx.heads.registry import list_heads, load_head  # noqa: E402
from featx.use.export import export_onnx, refusal  # noqa: E402
from featx.use.predict import Backbone, Predictor, head_probabilities  # noqa: E402
from featx.vocab import OPEN_SET_SCORES  # noqa: E402
from tests.conftest import make_class_folders  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Three colours, resnet18 (random weights, fp32), every head compared and saved, and the best exported."""
    from featx.embed.extraction import ExtractConfig, extract

    root = tmp_path_factory.mktemp("export")
    data = make_class_folders(root / "colours", per_class=10, splits=("train", "val", "test"))
    config = ExtractConfig(backbone="resnet18", weights="none", image_size=64, batch_size=8, precision="fp32",
                           cache_dir=str(root / "cache"))
    embeddings = extract(data, config, progress=False).path
    save_run(compare([embeddings], list_heads()), root / "run")
    export_onnx(root / "run", root / "best.onnx")
    return root


def images_of(run) -> list[Path]:
    return sorted((run / "colours" / "test").rglob("*.jpg"))


def onnx_answers(model: Path, images: list[Path]):
    """The exported graph on ``images``, prepared as its metadata says (featx's own resize and crop)."""
    session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    meta = {key: json.loads(value) for key, value in session.get_modelmeta().custom_metadata_map.items()}
    preprocess = Preprocess.from_dict(meta["input"]["preprocess"])
    batch = np.stack([load_image(path, preprocess) for path in images])
    return meta, session.run(None, {"image": batch})


@pytest.mark.parametrize("head", [None, *list_heads()])
def test_every_head_answers_in_onnxruntime_as_featx_predict_does(run, head):
    model = run / "best.onnx" if head is None else export_onnx(run / "run", run / f"{head}.onnx", head=head).path
    assert_round_trip(run / "run", model, head, images_of(run))


def assert_round_trip(run: Path, model: Path, head: str | None, images: list[Path]) -> None:
    """onnxruntime's probabilities within 1e-4 of featx predict's and the same top-1 on every image; for the best
    head, also the same "unknown" answers."""
    meta, outputs = onnx_answers(model, images)
    predictor = Predictor(run)
    if head is not None:  # the same backbones, this head's probabilities
        predictor.head = load_head(head_files(run, head)[0])
        predictor.steps = predictor.head["remedies"]
    _, features, _ = predictor.features(images)
    _, expected, _ = head_probabilities(predictor.head, features, predictor.steps)
    assert meta["head"] == predictor.head["head"] and meta["classes"] == predictor.classes
    assert np.abs(outputs[0] - expected).max() < 1e-4
    assert (outputs[0].argmax(1) == expected.argmax(1)).all()
    if head is None:  # the best head also says "unknown" as predict does
        thresholds = meta["open_set"]["thresholds"]
        predictions = predictor.predict(images)
        knn = outputs[1][:, OPEN_SET_SCORES.index("knn")]
        assert [meta["classes"][k] if s <= thresholds["knn"] else "unknown"
                for k, s in zip(outputs[0].argmax(1), knn)] == [p.prediction for p in predictions]
        assert np.abs(knn - [p.unknown_score for p in predictions]).max() < 1e-4
    else:
        assert len(outputs) == 1 and "open_set" not in meta


@pytest.mark.slow  # about a minute: the bundled sample embedded with real weights, then six exports
def test_every_head_of_the_bundled_sample_round_trips(tmp_path):
    from featx.data.sample import sample_path
    from featx.embed.extraction import ExtractConfig, extract

    made = extract(sample_path(), ExtractConfig(precision="fp32", cache_dir=str(tmp_path / "cache")), progress=False)
    save_run(compare([made.path], list_heads()), tmp_path / "run")
    images = sorted((sample_path() / "test").rglob("*.jpeg"))
    for head in [None, *list_heads()]:
        model = export_onnx(tmp_path / "run", tmp_path / f"{head}.onnx", head=head).path
        assert_round_trip(tmp_path / "run", model, head, images)


def readme_example() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("```python", readme.index("featx export runs/sample"))
    return readme[start + len("```python"):readme.index("```", start + 3)]


def test_the_readmes_example_needs_only_onnxruntime_pillow_and_numpy(run, monkeypatch):
    code = readme_example()
    assert set(re.findall(r"^(?:import|from) (\w+)", code, re.M)) <= {"json", "sys", "numpy", "onnxruntime", "PIL"}
    images = images_of(run)
    monkeypatch.chdir(run)
    shutil.copy(run / "best.onnx", run / "model.onnx")
    monkeypatch.setattr(sys, "argv", ["example.py", *map(str, images)])
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    predictions = Predictor(run / "run").predict(images)
    assert [label for _, label in namespace["answers"]] == [p.prediction for p in predictions]
    _, expected = onnx_answers(run / "best.onnx", images)
    assert np.abs(namespace["probabilities"] - expected[0]).max() < 1e-6  # Pillow alone prepares the same pixels


def test_replayed_remedies_are_in_the_graph(run, tmp_path):
    """A re-weighting to another class balance (prior shift) is replayed inside the graph."""
    copy = shutil.copytree(run / "run", tmp_path / "run")
    head_file = copy / "best" / "head.json"
    head = json.loads(head_file.read_text())
    head["remedies"] = [{"name": "prior_shift", "stage": "scores",
                         "replay": {"source": [0.2, 0.3, 0.5], "target": [0.6, 0.3, 0.1]}}]
    head_file.write_text(json.dumps(head))
    exported = export_onnx(copy, tmp_path / "shifted.onnx")
    _, plain = onnx_answers(run / "best.onnx", images_of(run))
    _, shifted = onnx_answers(exported.path, images_of(run))
    weighted = plain[0] * [3.0, 1.0, 0.2]
    assert np.abs(shifted[0] - weighted / weighted.sum(1, keepdims=True)).max() < 1e-5
    assert np.abs(shifted[0] - plain[0]).max() > 1e-3


def test_what_cannot_be_exported_is_refused_with_the_reason(run, tmp_path):
    board = compare([next((run / "cache").rglob("*.h5"))], ["logreg"], smooth_test=3)
    save_run(board, tmp_path / "smoothed")
    with pytest.raises(DataError, match="smooth_test: it spreads each image"):
        export_onnx(tmp_path / "smoothed", tmp_path / "smoothed.onnx")
    assert not (tmp_path / "smoothed.onnx").exists()
    meta = load_head(run / "run" / "best" / "head.json")["embeddings_meta"]
    adapted = Backbone(run, {**meta, "config": {**meta["config"], "adapt_bn": True}})
    assert refusal([adapted], []).startswith("adapt_bn: its features were embedded with BatchNorm statistics")
    viewed = Backbone(run, {**meta, "config": {**meta["config"], "tta_views": 4}})
    assert refusal([viewed], []).startswith("tta_views:")
    larger = Backbone(run, {**meta, "image_size": 96, "resize": 110})
    assert "prepared differently" in refusal([Backbone(run, meta), larger], [])
    assert refusal([Backbone(run, meta)], [{"name": "align", "stage": "features", "replay": {}}]) == ""


def test_the_command_line(run, tmp_path):
    done = CliRunner().invoke(main, ["export", str(run / "run"), "--onnx", str(tmp_path / "m.onnx"),
                                     "--head", "logreg"])
    assert done.exit_code == 0, done.output
    assert "wrote" in done.output and "logreg on resnet18" in done.output and (tmp_path / "m.onnx").exists()
    missing = CliRunner().invoke(main, ["export", str(run / "run"), "--onnx", str(tmp_path / "x.onnx"),
                                        "--head", "nope"])
    assert missing.exit_code == 2 and "no saved head 'nope'; it has knn, lightgbm, logreg, mlp, svm" in missing.output
