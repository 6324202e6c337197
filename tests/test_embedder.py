"""``featx.sklearn.ImageEmbedder``: image paths to features inside scikit-learn, each image embedded once."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sklearn.utils.estimator_checks as checks
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline

from featx.embed.extraction import extract
from featx.errors import DataError
from featx.store.embeddings import load_embeddings
from featx.sklearn import ImageEmbedder
from tests.conftest import make_class_folders, make_image

# scikit-learn's checks that apply to a transformer of image paths. The others feed it random numeric arrays
# (fit, transform, pickling, dtypes, sample order and subsets, NaN, sparse input...) where ImageEmbedder takes
# paths, and scikit-learn itself skips them for an estimator whose input tags say so; the tests below check
# the same properties with images.
API_CHECKS = ("check_no_attributes_set_in_init", "check_parameters_default_constructible",
              "check_get_params_invariance", "check_set_params", "check_estimator_repr",
              "check_estimator_tags_renamed", "check_valid_tag_types",
              "check_do_not_raise_errors_in_init_or_set_params", "check_estimator_cloneable", "check_estimators_unfitted", "check_mixin_order",
              "check_n_features_in_after_fitting")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    data = make_class_folders(tmp_path_factory.mktemp("embedder") / "colours", per_class=6, splits=("train",))
    paths = sorted(str(p) for p in data.rglob("*.jpg"))
    return paths, [p.split("/")[-2] for p in paths]


def tiny(cache) -> ImageEmbedder:
    return ImageEmbedder(backbone="resnet18", weights="none", image_size=32, cache_dir=str(cache))


@pytest.mark.parametrize("check", API_CHECKS)
def test_scikit_learn_checks_that_apply_to_paths(check, tmp_path):
    getattr(checks, check)("ImageEmbedder", tiny(tmp_path))


def test_grid_search_embeds_each_image_once_across_folds_and_candidates(images, counted, tmp_path):
    paths, labels = images
    search = GridSearchCV(make_pipeline(tiny(tmp_path), LogisticRegression(max_iter=300)),
                          {"logisticregression__C": [0.1, 1.0, 10.0]}, cv=3).fit(paths, labels)
    assert counted["images"] == len(paths) == 18  # 3 folds × 3 candidates and the refit: one forward an image
    assert search.best_score_ > 0.5  # three plain colours; random weights still tell them apart
    counted["images"] = 0
    again = make_pipeline(tiny(tmp_path), LogisticRegression(max_iter=300)).fit(paths[::-1], labels[::-1])
    assert counted["images"] == 0 and list(again.predict(paths)) == list(search.predict(paths))


def test_images_featx_extract_embedded_are_not_embedded_again(images, counted, tmp_path):
    paths, _ = images
    root = Path(paths[0]).parents[2]  # the dataset folder: root/train/<class>/<image>
    extracted = load_embeddings(extract(root, tiny(tmp_path).config(), progress=False).path)
    counted["images"] = 0
    features = tiny(tmp_path).fit_transform(paths[::-1])
    assert counted["images"] == 0  # every row copied from the dataset's own file, in another cache folder
    by_path = {str(root / p): row for row, p in enumerate(extracted.paths)}
    assert np.array_equal(features, extracted.features_at([by_path[p] for p in paths[::-1]]))


def test_features_follow_the_paths_order_and_subsets_and_survive_pickling(images, tmp_path):
    paths, _ = images
    embedder = tiny(tmp_path).fit(paths)
    whole = embedder.transform(paths)
    assert whole.shape == (18, 512) and whole.dtype == np.float32
    order = np.random.default_rng(0).permutation(len(paths))
    assert np.array_equal(embedder.transform([paths[i] for i in order]), whole[order])
    assert np.array_equal(embedder.transform(paths[3:7]), whole[3:7])  # batch companions change no bit
    assert np.array_equal(pickle.loads(pickle.dumps(embedder)).transform(paths), whole)
    assert np.array_equal(clone(embedder).fit_transform(paths), whole)


def test_pandas_in_and_out(images, tmp_path):
    paths, _ = images
    series = pd.Series(paths, index=[f"image{i}" for i in range(len(paths))], name="path")
    embedder = tiny(tmp_path).set_output(transform="pandas")
    frame = embedder.fit_transform(series)
    assert isinstance(frame, pd.DataFrame) and list(frame.index) == list(series.index)
    assert list(frame.columns[:2]) == ["resnet18_0", "resnet18_1"]
    assert list(embedder.get_feature_names_out()) == list(frame.columns)
    column = embedder.set_output(transform="default").transform(series.to_frame())  # one column, as ColumnTransformer
    assert np.array_equal(column, frame.to_numpy())


def test_bad_input_is_named(images, tmp_path):
    paths, _ = images
    with pytest.raises(DataError, match="takes image paths; got float"):
        tiny(tmp_path).fit(np.zeros(3))
    with pytest.raises(DataError, match="missing.jpg: no such file"):
        tiny(tmp_path).fit([paths[0], str(tmp_path / "missing.jpg")])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(DataError, match="broken.jpg"):
        tiny(tmp_path).fit([paths[0], str(broken)])
    make_image(broken, (10, 200, 10))  # once mended, the same call goes through
    assert tiny(tmp_path).fit_transform([paths[0], str(broken)]).shape == (2, 512)
