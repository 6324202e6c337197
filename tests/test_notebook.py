"""featx in a notebook: HTML for files, leaderboards and runs, Figures from the API, a map of the dataset, and the
example notebook run top to bottom."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from matplotlib.figure import Figure

import featx.comparison.embedding_map as embedding_map
from featx.cli.commands import main
from featx.comparison.embedding_map import dataset_map
from featx.comparison.evaluate import compare
from featx.comparison.runs import load_run, save_run
from featx.errors import ConfigError
from featx.store.embeddings import load_embeddings
from featx.store.fixtures import make_embeddings

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "example.ipynb"


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A synthetic file with three train labels flipped and one test image pointing away from every train image
    (train rows moved along the first axis, the planted one the other way)."""
    path = make_embeddings(tmp_path_factory.mktemp("map") / "planted.h5", n=300, dim=16, classes=3)
    emb = load_embeddings(path)
    train, test = emb.rows("train"), emb.rows("test")
    X, y = emb.features("train"), emb.labels("train")
    means = np.stack([X[y == k].mean(0) for k in range(3)])
    distance = np.linalg.norm(X[:, None] - means[None], axis=2)
    own = distance[np.arange(len(y)), y]
    distance[np.arange(len(y)), y] = np.inf
    flipped = np.sort(train[np.argsort(own - distance.min(1))[:3]])  # the most typical of their class
    with h5py.File(path, "r+") as handle:
        labels = handle["labels"][:]
        labels[flipped] = (labels[flipped] + 1) % 3
        handle["labels"][:] = labels
        features = handle["features"][:]
        features[train, 0] += 5.0
        features[test[0]] = 0.0
        features[test[0], 0] = -10.0
        handle["features"][:] = features
        del handle.attrs["checksums"]  # edited columns: files before featx 0.2 had no checksums either
    return path, flipped.tolist(), int(test[0])


def test_the_map_is_seeded_and_marks_planted_label_errors_and_an_unlike_test_image(planted):
    path, flipped, far = planted
    emb = load_embeddings(path)
    first, again = dataset_map(emb, method="tsne"), dataset_map(emb, method="tsne")
    assert np.array_equal(first.xy, again.xy) and first.xy.shape == (len(emb.rows()), 2)
    assert set(flipped) <= set(first.label_errors)
    assert first.least_like_train[0] == far
    figure = first.figure()
    assert isinstance(figure, Figure) and "seed 0" in figure.axes[0].get_title()
    assert figure._repr_png_()[:8] == b"\x89PNG\r\n\x1a\n"  # what Jupyter shows, pyplot or not


def test_a_large_file_is_sampled_with_every_marked_image_in_it(planted):
    emb = load_embeddings(planted[0])
    made = dataset_map(emb, method="tsne", max_points=60, marked=5)
    assert len(made.rows) == 60 and made.total == len(emb.rows())
    assert set(made.label_errors) | set(made.least_like_train) <= set(made.rows.tolist())


def test_featx_map_writes_a_png_and_refuses_umap_where_it_is_missing(planted, tmp_path, monkeypatch):
    out = tmp_path / "map.png"
    result = CliRunner().invoke(main, ["map", str(planted[0]), "--out", str(out), "--method", "tsne"])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "likely label errors" in result.output
    monkeypatch.setattr(embedding_map.importlib.util, "find_spec", lambda name: None)
    missing = CliRunner().invoke(main, ["map", str(planted[0]), "--method", "umap"])
    assert missing.exit_code == 2 and "needs umap-learn" in missing.output
    assert embedding_map.resolve_method("auto") == "tsne"


def test_html_of_a_file_a_leaderboard_and_a_run(tmp_path):
    path = make_embeddings(tmp_path / "s.h5", n=150, dim=8)
    emb = load_embeddings(path)
    page = emb._repr_html_()
    counts = re.findall(r"<tr><td>class0</td><td>(\d+)</td><td>(\d+)</td><td>(\d+)</td></tr>", page)
    assert counts == [tuple(str(int(((emb.labels_at() == 0) & (emb.splits == s)).sum()))
                            for s in ("train", "val", "test"))]
    assert emb.cache_key in page
    board = compare([emb], heads=["logreg", "knn"])
    marked = re.search(r'<tr style="font-weight:bold"><td>★\u00a0synthetic</td><td>(\w+)</td>', board._repr_html_())
    assert marked and marked.group(1) == board.best()["head"]
    result = board.result_of(board.best())
    assert len(result.confusion_figure("val").axes) == 2 and isinstance(result.roc_figure(), Figure)
    with pytest.raises(ConfigError, match="no 'train' scores"):
        result.confusion_figure("train")
    run = load_run(save_run(board, tmp_path / "<b>run"))
    page = run._repr_html_()
    assert "&lt;b&gt;run" in page and "<b>run" not in page.replace("<b>" + str(tmp_path), "")
    assert page.count('src="data:image/png;base64,') == 1


def _run_cells(cells: list[str], namespace: dict) -> None:
    """Each cell as Jupyter runs it: its statements, then its last expression, whose HTML is rendered as shown."""
    for source in cells:
        tree = ast.parse(source)
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, "<cell>", "exec"), namespace)
        if last is not None:
            shown = eval(compile(ast.Expression(last.value), "<cell>", "eval"), namespace)
            shown_as = [getattr(shown, m)() for m in ("_repr_html_", "_repr_png_") if hasattr(shown, m)]
            assert not shown_as or any(shown_as), source  # as Jupyter shows it: HTML, else a PNG


def test_the_example_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    notebook = json.loads(NOTEBOOK.read_text())
    code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert "parameters" in code[0]["metadata"].get("tags", [])
    monkeypatch.chdir(tmp_path)
    tiny = 'BACKBONE, WEIGHTS, IMAGE_SIZE = "resnet18", "none", 32\nWORK = "featx-example"\n'
    namespace: dict = {}
    _run_cells([tiny] + ["".join(c["source"]) for c in code[1:]], namespace)
    assert (tmp_path / "featx-example" / "run" / "run.json").exists()
    assert len(namespace["frame"]) == 200 and namespace["board"].rows
