import importlib
import re
import subprocess
import sys
from pathlib import Path

import featx

FIXTURE = Path(__file__).parent / "fixtures" / "chest_xray_efficientnet_lite0.h5"


def test_import_featx_is_light():
    code = "import sys, featx; assert 'torch' not in sys.modules and 'sklearn' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_public_api_as_an_analyst_types_it(image_folder, tiny_config):
    importlib.import_module("featx.embed.extraction")  # once loaded, the submodule must not shadow featx.extract()

    result = featx.extract(image_folder, tiny_config, progress=False)
    emb = featx.load_embeddings(result.path)
    assert emb.features("train").shape[1] == 512 and len(emb.labels("train")) == len(emb.features("train"))
    assert emb.classes == ["blue", "green", "red"] and emb.meta["backbone"] == "resnet18"
    board = featx.compare([featx.load_embeddings(FIXTURE)], heads=["logreg", "knn"])
    assert board.best()["head"] in {"logreg", "knn"} and "| logreg |" in board.to_markdown()
    assert "efficientnet_lite0" in featx.list_backbones() and "lightgbm" in featx.list_heads()


def test_the_public_api_needs_no_reaching_into_modules(tmp_path):
    import featx.use.advisor
    import featx.finetuning.training  # importing the modules must not replace the functions of the same purpose

    for name in featx.__all__:
        assert getattr(featx, name) is not None, name
    assert featx.finetune is featx.finetuning.training.finetune and featx.advise is featx.use.advisor.advise
    assert featx.FinetuneConfig().unfreeze == "all" and featx.ExtractConfig().fit == "crop"
    board = featx.compare([FIXTURE], ["logreg"])
    run = featx.load_run(featx.save_run(board, tmp_path / "run"))
    assert run.rows[0]["head"] == "logreg" and run.info["inputs"][0]["cache_key"] == board.inputs[0].cache_key
    assert featx.write_report(tmp_path / "run").name == "report.html"
    assert callable(featx.Predictor)


def test_every_name_the_api_docs_list_is_on_featx():
    """docs/api.md's table of public names and featx.__all__ are the same list, and each name resolves."""
    table = (Path(__file__).parents[1] / "docs" / "api.md").read_text().split("## Public names")[1]
    documented = set()
    for cell in re.findall(r"^\| (.+?) \|", table, flags=re.M):
        documented |= set(re.findall(r"`(\w+)(?:\(|`)", cell))
    assert documented - {"name"} == set(featx.__all__) - {"__version__"}
    for name in documented - {"name"}:
        assert getattr(featx, name) is not None, name
