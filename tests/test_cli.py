import json

import h5py
import pytest
from click.testing import CliRunner

from featx.cli.commands import main
from featx.store.embeddings import load_embeddings

TINY = ["--backbone", "resnet18", "--weights", "none", "--image-size", "64", "--batch-size", "4"]


@pytest.fixture
def runner():
    return CliRunner()


def test_help_for_every_command(runner):
    top = runner.invoke(main, ["--help"])
    assert top.exit_code == 0
    for name, command in main.commands.items():
        assert name in top.output
        result = runner.invoke(main, [name, "--help"])
        assert result.exit_code == 0 and "Usage: main " + name in result.output.replace("featx", "main")
        for param in command.params:
            if param.param_type_name == "option" and not param.hidden:
                assert param.opts[0] in result.output, f"{name} {param.opts[0]} undocumented"


def test_extract_ls_info_round_trip(runner, image_folder, tmp_path):
    cache = tmp_path / "cache"
    first = runner.invoke(main, ["extract", str(image_folder), *TINY, "--out", str(cache), "--split", "0.5,0.25,0.25"])
    assert first.exit_code == 0, first.output
    assert "colours: 18 images, 3 classes" in first.output and "wrote" in first.output
    path = next(cache.rglob("*.h5"))
    assert load_embeddings(path).meta["backbone"] == "resnet18"
    second = runner.invoke(main, ["extract", str(image_folder), *TINY, "--out", str(cache), "--split", "0.5,0.25,0.25"])
    assert second.exit_code == 0 and "cached" in second.output and "nothing to do" in second.output
    listing = runner.invoke(main, ["ls", str(cache)])
    assert listing.exit_code == 0
    assert "colours" in listing.output and "resnet18" in listing.output and "512" in listing.output
    assert listing.output.splitlines()[1].endswith("64 px crop")  # how it was made: what tells files apart
    shown = runner.invoke(main, ["info", str(path)])
    assert shown.exit_code == 0
    assert "rows × dim: 18 × 512" in shown.output and "weights: none" in shown.output
    assert "split" in shown.output and "blue" in shown.output

    # long lists (a fine-tuned backbone's 783 validation images) are counted, and shown whole on request
    with h5py.File(path, "a") as handle:
        handle.attrs["backbone_validation"] = json.dumps({"images": [f"v/{i}.png" for i in range(40)], "seed": 0})
    brief = runner.invoke(main, ["info", str(path)])
    assert "backbone_validation: {'images': [40 items: 'v/0.png', 'v/1.png', …; --full lists them], 'seed': 0}" \
        in brief.output and "v/39.png" not in brief.output
    assert "v/39.png" in runner.invoke(main, ["info", str(path), "--full"]).output


def test_several_backbones_in_one_call(runner, image_folder, tmp_path):
    result = runner.invoke(main, ["extract", str(image_folder), *TINY, "--backbone", "mobilenet_v3_large",
                                  "--out", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert {p.name.split("-")[0] for p in (tmp_path / "c").rglob("*.h5")} == {"resnet18", "mobilenet_v3_large"}


def test_bad_images_are_reported_and_the_run_succeeds(runner, image_folder, tmp_path):
    (image_folder / "red" / "zero.jpg").write_bytes(b"")
    result = runner.invoke(main, ["extract", str(image_folder), *TINY, "--out", str(tmp_path / "c")])
    assert result.exit_code == 0
    assert "1 unreadable images skipped" in result.output and "red/zero.jpg: empty file" in result.output


@pytest.mark.parametrize("args, code, message", [
    (["extract", "/no/such/dir"], 2, "does not exist"),
    (["extract"], 2, "give either DATA_DIR or --sample"),
    (["extract", "{data}", "--backbone", "resnt50", "--weights", "none"], 2, "did you mean resnet50"),
    (["extract", "{data}", "--layer", "stage7", "--weights", "none"], 2, "Invalid value for '--layer'"),
    (["extract", "{data}", "--split", "0.9,0.9,0.1"], 2, "Invalid value for '--split': must be train,val,test fractions"),
    (["extract", "{data}", "--weights", "/no/file.pth"], 2, "weights file not found"),
    (["info", "{text}"], 2, "not an HDF5 file"),
    (["ls", "/no/such/cache"], 2, "no such folder"),
])
def test_user_mistakes_get_one_line_and_exit_2(runner, image_folder, tmp_path, args, code, message):
    (tmp_path / "notes.h5").write_text("hello")
    args = [a.format(data=image_folder, text=tmp_path / "notes.h5") for a in args]
    result = runner.invoke(main, args)
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_missing_weights_exit_1_with_where_to_put_them(runner, image_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    result = runner.invoke(main, ["extract", str(image_folder), "--backbone", "resnet18", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output.startswith("colours:") and "featx: error: no pretrained weights for backbone" in result.output


def test_list_shows_the_registry(runner):
    result = runner.invoke(main, ["list"])
    assert result.exit_code == 0 and "efficientnet_lite0" in result.output and "timm:<name>" in result.output


def test_demo_runs_end_to_end(runner, tmp_path):
    result = runner.invoke(main, ["demo", "--backbone", "resnet18", "--weights", "none", "--image-size", "64",
                                  "--heads", "logreg,knn", "--out", str(tmp_path / "demo"),
                                  "--cache", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    assert "| resnet18 | logreg |" in result.output and "3/3 report:" in result.output
    assert (tmp_path / "demo" / "report.html").stat().st_size > 10_000
    assert (tmp_path / "demo" / "best" / "head.json").exists()


def test_heads_may_be_repeated_as_well_as_comma_separated(runner, tmp_path):
    fixture = "tests/fixtures/chest_xray_efficientnet_lite0.h5"
    boards = []
    for args in (["--heads", "logreg", "--heads", "knn"], ["--heads", "logreg,knn"]):
        result = runner.invoke(main, ["compare", fixture, *args, "--out", str(tmp_path / str(len(boards)))])
        assert result.exit_code == 0, result.output
        boards.append(json.loads((tmp_path / str(len(boards)) / "leaderboard.json").read_text()))
    assert sorted(r["head"] for r in boards[0]) == ["knn", "logreg"]
    assert [(r["head"], r["test_accuracy"]) for r in boards[0]] == [(r["head"], r["test_accuracy"]) for r in boards[1]]
