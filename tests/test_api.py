import importlib
import subprocess
import sys
from pathlib import Path

import featx

FIXTURE = Path(__file__).parent / "fixtures" / "chest_xray_efficientnet_lite0.h5"


def test_import_featx_is_light():
    code = "import sys, featx; assert 'torch' not in sys.modules and 'sklearn' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_public_api_as_an_analyst_types_it(image_folder, tiny_config):
    importlib.import_module("featx.extraction")  # once loaded, the submodule must not shadow featx.extract()

    result = featx.extract(image_folder, tiny_config, progress=False)
    emb = featx.load_embeddings(result.path)
    assert emb.features("train").shape[1] == 512 and len(emb.labels("train")) == len(emb.features("train"))
    assert emb.classes == ["blue", "green", "red"] and emb.meta["backbone"] == "resnet18"
    board = featx.compare([featx.load_embeddings(FIXTURE)], heads=["logreg", "knn"])
    assert board.best()["head"] in {"logreg", "knn"} and "| logreg |" in board.to_markdown()
    assert "efficientnet_lite0" in featx.list_backbones() and "lightgbm" in featx.list_heads()
