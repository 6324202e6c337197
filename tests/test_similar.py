"""Similar images: the nearest rows by cosine, against brute force, by row or by a new image embedded first."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from featx.cli.commands import main
from featx.embed.extraction import ExtractConfig, extract
from featx.store.embeddings import load_embeddings
from featx.store.fixtures import make_embeddings
from featx.store.neighbours import NeighbourIndex
from tests.conftest import make_class_folders


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return load_embeddings(make_embeddings(tmp_path_factory.mktemp("similar") / "s.h5", n=600, dim=32, classes=4))


def brute_force(emb, query_row, rows, k):
    X = emb.features_at(rows)
    q = emb.features_at([query_row])[0]
    cosine = X @ q / (np.linalg.norm(X, axis=1) * np.linalg.norm(q))
    order = np.argsort(-cosine, kind="stable")[:k]
    return rows[order], cosine[order]


@pytest.mark.parametrize("row", [0, 17, 599])
def test_exact_neighbours_are_the_brute_force_ones(synthetic, row):
    found = synthetic.neighbours(row, k=8)
    rows = synthetic.rows()
    expected, cosine = brute_force(synthetic, row, rows[rows != row], 8)
    assert [n.row for n in found] == expected.tolist()
    np.testing.assert_allclose([n.similarity for n in found], cosine, atol=1e-5)
    assert all(n.path == synthetic.paths[n.row] and n.label == f"class{synthetic.labels_at()[n.row]}" for n in found)


def test_a_split_is_searched_alone_and_faiss_finds_nearly_all_true_neighbours(synthetic):
    assert {n.split for n in synthetic.neighbours(5, k=20, split="test")} == {"test"}
    exact = NeighbourIndex(synthetic.features(), "exact").query(synthetic.features()[:50], 10)[0]
    graph = NeighbourIndex(synthetic.features(), "faiss").query(synthetic.features()[:50], 10)[0]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, graph)])
    assert recall > 0.95


def test_a_new_image_is_embedded_with_the_files_recipe_and_finds_itself(tmp_path):
    data = make_class_folders(tmp_path / "colours", per_class=4)
    config = ExtractConfig(backbone="resnet18", weights="none", image_size=32, precision="fp32", dtype="float32",
                           cache_dir=str(tmp_path / "cache"))
    file = extract(data, config, progress=False).path
    emb = load_embeddings(file)
    image = data / emb.paths[7]
    result = CliRunner().invoke(main, ["similar", str(file), str(image), "-k", "3", "--json"])
    assert result.exit_code == 0, result.output
    found = json.loads(result.output)
    assert found[0]["row"] == 7 and found[0]["similarity"] > 0.999 and len(found) == 3
    by_row = CliRunner().invoke(main, ["similar", str(file), "7", "-k", "2"])
    assert by_row.exit_code == 0 and by_row.output.splitlines()[0].split() == ["rank", "similarity", "row", "split",
                                                                                "label", "path"]
    assert [line.split()[2] for line in by_row.output.splitlines()[1:]] == [str(n["row"]) for n in found[1:]]
    not_image = CliRunner().invoke(main, ["similar", str(file), str(file)])
    assert not_image.exit_code == 2 and "cannot decode" in not_image.output


def test_bad_queries_are_named(synthetic, tmp_path):
    runner = CliRunner()
    for query, message in [("600", "no row 600; rows are 0 to 599"), ("missing.jpg", "missing.jpg: no such image"),
                           (str(synthetic.path), "made without a backbone (synthetic)")]:
        result = runner.invoke(main, ["similar", str(synthetic.path), query])
        assert result.exit_code == 2 and message in result.output, result.output
    with pytest.raises(Exception, match="a query of 3 features; this file's have 32"):
        synthetic.neighbours(np.ones(3))
