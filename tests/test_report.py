import re
import shutil

from click.testing import CliRunner

from featx.cli.commands import main
from featx.comparison.evaluate import compare
from featx.comparison.runs import save_run
from featx.embed.extraction import extract
from featx.store.embeddings import load_embeddings
from tests.conftest import make_class_folders


def test_report_has_every_section_and_escapes_user_strings(tmp_path, tiny_config):
    data = make_class_folders(tmp_path / "data", per_class=10, splits=("train", "val", "test"))
    for split in ("train", "val", "test"):
        shutil.move(data / split / "red", data / split / "<script>")  # a hostile class name
    emb = load_embeddings(extract(data, tiny_config, progress=False).path)
    assert "<script>" in emb.classes
    save_run(compare([emb], ["logreg", "knn"]), tmp_path / "run")
    result = CliRunner().invoke(main, ["report", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    html = (tmp_path / "run" / "report.html").read_text()
    for section in ("leaderboard", "heads", "examples", "wrong", "provenance", "map"):
        assert f'id="{section}"' in html
    assert "<script>" not in html and "&lt;script&gt;" in html
    # confusion val + test and ROC test of 2 heads, and the map of the dataset, also left in the run folder
    assert len(re.findall(r'src="data:image/png;base64,', html)) == 7
    assert (tmp_path / "run" / "plots" / f"map_{emb.path.stem}.png").stat().st_size > 10_000
    assert len(re.findall(r'src="data:image/jpeg;base64,', html)) >= 3  # example thumbnails
    assert 'src="http' not in html and "src='http" not in html  # self-contained
    assert emb.cache_key in html


def test_report_of_a_fine_tuned_backbone_shows_its_curves(tmp_path):
    from featx.embed.extraction import ExtractConfig
    from featx.finetuning.training import FinetuneConfig, finetune

    data = make_class_folders(tmp_path / "data", per_class=8, splits=("train", "val", "test"))
    finetune(data, FinetuneConfig(backbone="resnet18", weights="none", image_size=32, epochs=1, aug="none"),
             out=tmp_path / "ft", progress=False)
    emb = extract(data, ExtractConfig(checkpoint=str(tmp_path / "ft" / "best.pt"), cache_dir=str(tmp_path / "c")),
                  progress=False)
    save_run(compare([emb.path], ["logreg"]), tmp_path / "run")
    result = CliRunner().invoke(main, ["report", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    html = (tmp_path / "run" / "report.html").read_text()
    assert 'id="finetune"' in html and "fine-tune run" in html


def test_report_needs_a_run_folder(tmp_path):
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "no run.json" in result.output


def test_report_says_whether_the_figures_can_be_trusted(tmp_path):
    import numpy as np

    from tests.test_adapt import blobs, write_file

    rng = np.random.default_rng(5)
    X_train, y_train = blobs(rng, 300)
    X_test, y_test = blobs(rng, 150, shift=1.0, contrast=0.7)  # other images than train's
    y_train[:6] = 1 - y_train[:6]  # six wrong labels
    file = write_file(tmp_path, np.r_[X_train, X_test], np.r_[y_train, y_test], ["train"] * 300 + ["test"] * 150)
    save_run(compare([file], ["logreg"], prior_shift="estimate"), tmp_path / "run")
    result = CliRunner().invoke(main, ["report", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    html = (tmp_path / "run" / "report.html").read_text()
    assert 'id="audit"' in html and "The test images differ from the training ones" in html
    assert "Class balance of the test images" in html
    found = int(re.search(r"Likely label errors in train \((\d+)\)", html).group(1))
    assert 4 <= found <= 15  # most of the six, and few others
