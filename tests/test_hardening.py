"""Real-world mess, case by case (issue 12's numbering): never code run from a file, never a wedged cache, never a
traceback for a user's mistake, never a silent wrong answer, nothing dropped without a word."""

import json
import os
import shutil
import time
import warnings
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from featx.embed.backbones import get_backbone
from featx.cli.commands import main
from featx.data.datasets import scan_dataset
from featx.errors import ConfigError, DataError, FeatxError
from featx.comparison.evaluate import compare
from featx.embed.extraction import extract
from featx.data.images import ImageError, Preprocess, load_image
from featx.comparison.runs import save_run
from featx.store.embeddings import load_embeddings
from tests.conftest import make_class_folders, make_image

FIXTURE = Path(__file__).parent / "fixtures" / "chest_xray_efficientnet_lite0.h5"
TINY = ["--backbone", "resnet18", "--weights", "none", "--image-size", "64", "--batch-size", "4"]


def invoke(*args):
    """Run the CLI as a user would; the result must never be an exception other than an exit."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    return result


def one_line_error(result, code: int, *fragments: str) -> None:
    errors = [line for line in result.output.splitlines() if line.startswith(("featx: error:", "Error:"))]
    assert result.exit_code == code, result.output
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


# --- unsafe -----------------------------------------------------------------------------------------------
# 1. is in test_predict (a planted joblib head never runs without --trust) and test_heads (foreign types refused).

def test_2_a_decompression_bomb_is_a_recorded_skip_never_decoded(tmp_path, monkeypatch):
    huge = tmp_path / "huge.png"
    Image.new("1", (8000, 7000)).save(huge)  # 56 Mpx of zeros: a few KB on disk, over the 50 Mpx budget
    with pytest.raises(ImageError, match=r"8000×7000 = 56 Mpx is over the pixel budget of 50 Mpx"):
        load_image(huge, Preprocess(64, 73))
    small = make_image(tmp_path / "small.png", (10, 10, 10), size=(80, 80), fmt="PNG")
    with pytest.raises(ImageError, match="over the pixel budget of 0.001 Mpx"):
        load_image(small, Preprocess(64, 73, max_pixels=1000))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # 6,400 px: Pillow only warns, and featx used to decode
    with pytest.raises(ImageError, match="decompression bomb refused"):
        load_image(small, Preprocess(64, 73))


def test_3_csv_paths_must_stay_inside_the_csv_folder(tmp_path):
    make_image(tmp_path / "outside.jpg", (200, 30, 30))
    data = tmp_path / "data"
    for i in range(4):
        make_image(data / f"{i}.jpg", (30, 30, 200), seed=i)
    (data / "labels.csv").write_text("path,label\n0.jpg,a\n1.jpg,b\n2.jpg,a\n../outside.jpg,b\n")
    with pytest.raises(DataError, match=r"labels.csv:5: ../outside.jpg resolves outside the CSV's folder"):
        scan_dataset(data / "labels.csv")
    allowed = scan_dataset(data / "labels.csv", allow_outside_root=True)
    assert "../outside.jpg" in [s.path for s in allowed.samples]
    result = invoke("extract", data / "labels.csv", *TINY, "--out", tmp_path / "c")
    one_line_error(result, 2, "resolves outside", "--allow-outside-root")


# --- data lost --------------------------------------------------------------------------------------------

def test_4_a_full_disk_stops_in_one_line_and_the_run_resumes_to_identical_rows(tiny_run, tmp_path, monkeypatch):
    import featx.store.embeddings

    data, emb_path, _, config = tiny_run
    real = shutil.disk_usage
    calls = {"n": 0}

    def filling_up(path):
        calls["n"] += 1
        usage = real(path)
        return usage._replace(free=usage.free if calls["n"] <= 3 else 1_000_000)  # full after two batches

    monkeypatch.setattr(featx.store.embeddings.shutil, "disk_usage", filling_up)
    small = replace(config, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(FeatxError, match=r"^disk full: \d+ MB needed, 1 MB free at .*; free some space"):
        extract(data, small, progress=False)
    partial = next((tmp_path / "cache").rglob("*.partial"))
    with h5py.File(partial) as handle:
        assert handle.attrs["rows_done"] == 8  # the two batches that were written and flushed
    monkeypatch.setattr(featx.store.embeddings.shutil, "disk_usage", real)
    resumed = extract(data, small, progress=False)
    assert resumed.resumed_from == 8
    np.testing.assert_array_equal(load_embeddings(resumed.path).features(), load_embeddings(emb_path).features())


def test_4_a_damaged_last_chunk_rolls_back_instead_of_wedging_the_cache(tiny_run, tmp_path):
    data, emb_path, _, config = tiny_run
    cache = tmp_path / "cache"
    partial = cache / emb_path.parent.name / (emb_path.name + ".partial")
    partial.parent.mkdir(parents=True)
    shutil.copy(emb_path, partial)
    with h5py.File(partial, "r+") as handle:  # as a crash left it: 16 rows claimed, not complete
        handle.attrs["rows_done"], handle.attrs["complete"] = 16, False
        offset, size = handle["features"].id.get_chunk_info(0).byte_offset, handle["features"].id.get_chunk_info(0).size
    with open(partial, "r+b") as raw:  # the chunk's bytes torn, as a full disk leaves them
        raw.seek(offset + size // 2)
        raw.write(b"\xff" * 64)
    listing = invoke("ls", cache)
    assert "damaged after row 0 (resumes there)" in listing.output
    resumed = extract(data, replace(config, cache_dir=str(cache)), progress=False)
    assert resumed.resumed_from == 0
    np.testing.assert_array_equal(load_embeddings(resumed.path).features(), load_embeddings(emb_path).features())


# --- silent wrong results ---------------------------------------------------------------------------------

def damaged_copy(source: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(source, folder / source.name))


def test_5_flipped_bits_and_damaged_blocks_are_named_never_used(tiny_run, tmp_path):
    data, emb_path, _, config = tiny_run
    flipped = damaged_copy(emb_path, tmp_path / "flipped")
    with h5py.File(flipped, "r+") as handle:
        offset = handle["labels"].id.get_chunk_info(0).byte_offset
    with open(flipped, "r+b") as raw:
        raw.seek(offset)
        raw.write(bytes([raw.read(1)[0] ^ 0x01]))  # one bit of one label
    with pytest.raises(DataError, match=r"flipped/.*: damaged file \(.*\); re-extract with `featx extract … --force`"):
        load_embeddings(flipped)
    one_line_error(invoke("info", flipped), 2, "damaged file", "--force")

    cache = tmp_path / "cache"
    torn = damaged_copy(emb_path, cache / emb_path.parent.name)
    with h5py.File(torn, "r+") as handle:
        info = handle["features"].id.get_chunk_info(0)
    with open(torn, "r+b") as raw:
        raw.seek(info.byte_offset + 100)
        raw.write(b"\x00" * 32)
    one_line_error(invoke("compare", torn), 2, "damaged file")
    again = replace(config, cache_dir=str(cache))
    with pytest.raises(DataError, match="damaged file"):  # never "cached"
        extract(data, again, progress=False)
    assert not extract(data, again, progress=False, force=True).cached
    assert invoke("doctor", torn).exit_code == 0


def test_6_options_that_used_to_mean_something_silly_are_refused():
    one_line_error(invoke("compare", FIXTURE, "--threshold", "sensitivity=1.5"), 2, "--threshold")
    one_line_error(invoke("finetune", ".", "--lr", "-1"), 2, "--lr")
    one_line_error(invoke("compare", FIXTURE, "--threshold", "sensitivity=abc"), 2, "--threshold")
    one_line_error(invoke("compare", FIXTURE, "--threshold", "sensitivity=-1"), 2, "--threshold")
    one_line_error(invoke("compare", FIXTURE, "--seed", "-1"), 2, "--seed")
    one_line_error(invoke("compare", FIXTURE, "--heads", ","), 2, "no heads given")
    one_line_error(invoke("finetune", ".", "--epochs", "0", "--head-epochs", "0"), 2, "nothing to train")


def test_6_a_float_image_with_a_nan_pixel_is_unreadable_not_black(tmp_path):
    pixels = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    pixels[3, 3] = np.nan
    Image.fromarray(pixels, mode="F").save(tmp_path / "scan.tif")
    with pytest.raises(ImageError, match="1 of 4096 pixels are NaN or infinite"):
        load_image(tmp_path / "scan.tif", Preprocess(32, 36))


def test_6_predict_fails_when_nothing_could_be_read_and_report_when_plots_are_gone(tiny_run, tmp_path):
    _, _, run, _ = tiny_run
    (tmp_path / "a.jpg").write_bytes(b"not an image")
    (tmp_path / "b.jpg").write_bytes(b"")
    result = invoke("predict", run, tmp_path / "a.jpg", tmp_path / "b.jpg")
    assert result.exit_code == 1 and "featx: error: none of the 2 images could be read" in result.output
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    shutil.rmtree(copy / "plots")
    one_line_error(invoke("report", copy), 2, "plots of this run are missing", "re-run `featx compare --out`")


def test_6_an_image_replaced_in_place_with_its_old_size_and_timestamp_is_caught(tmp_path):
    data = make_class_folders(tmp_path / "d", per_class=4)
    image = data / "red" / "red_00.jpg"
    before = scan_dataset(data).fingerprint()
    stat = image.stat()
    time.sleep(0.05)  # past the file system's clock tick, so the change time can move
    make_image(image, (30, 30, 200), seed=77)  # another picture; same size forced below, old timestamp restored
    image.write_bytes(image.read_bytes()[:stat.st_size].ljust(stat.st_size, b"\0"))
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (image.stat().st_size, image.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    after = scan_dataset(data).fingerprint()  # the change time moved, so the files were hashed again
    assert after != before and scan_dataset(data, verify_content=True).fingerprint() == after
    assert "SHA-256" in scan_dataset(data).fingerprint_method


def test_6_a_path_listed_twice_is_refused(tmp_path):
    for i in range(3):
        make_image(tmp_path / f"{i}.jpg", (30, 30, 30), seed=i)
    (tmp_path / "labels.csv").write_text("path,label\n0.jpg,cat\n1.jpg,dog\n2.jpg,cat\n0.jpg,dog\n")
    with pytest.raises(DataError, match=r"labels.csv:5: 0.jpg is listed again \(first on line 2\)"):
        scan_dataset(tmp_path / "labels.csv")


def test_6_clamped_cv_says_so(caplog):
    X, y = np.random.default_rng(0).normal(size=(30, 4)), np.repeat([0, 1], 15)
    from featx.heads.registry import fit_head

    fitted = fit_head("logreg", X, y, cv=1000)
    assert fitted.tuned_on == "15-fold stratified CV on train"
    assert "1000-fold CV asked for, but the smallest class has 15 training rows" in caplog.text


def test_6_rows_of_two_files_are_told_apart_and_one_file_is_compared_once(tmp_path):
    other = Path(shutil.copy(FIXTURE, tmp_path / "full.h5"))
    with h5py.File(other, "r+") as handle:
        handle.attrs["cache_key"] = "ffffffffff"  # another extraction of the same backbone (another --fit, say)
    board = compare([FIXTURE, FIXTURE, other], ["logreg"])
    assert sorted(r["backbone"] for r in board.rows) == ["efficientnet_lite0 [1772f79db1]",
                                                         "efficientnet_lite0 [ffffffffff]"]


def test_6_a_reused_out_keeps_nothing_of_the_previous_run(tmp_path):
    save_run(compare([FIXTURE], ["logreg", "knn"]), tmp_path / "run")
    (tmp_path / "run" / "my-notes.txt").write_text("mine")
    save_run(compare([FIXTURE], ["logreg"]), tmp_path / "run")
    assert [p.name for p in (tmp_path / "run" / "heads").glob("*.json")] == ["chest_xray_efficientnet_lite0__logreg.json"]
    assert not list((tmp_path / "run").rglob("*knn*")) and (tmp_path / "run" / "my-notes.txt").exists()


# --- crashes that are one line now ------------------------------------------------------------------------

def test_7_a_file_name_that_is_not_utf8_is_kept_and_shown(tiny_run, tmp_path):
    data = make_class_folders(tmp_path / "d", per_class=4, splits=("train", "val", "test"))
    odd = os.fsencode(data / "train" / "red") + b"/caf\xe9.jpg"
    shutil.copy(data / "train" / "red" / "red_00.jpg", odd)
    _, _, run, config = tiny_run
    result = extract(data, replace(config, cache_dir=str(tmp_path / "c")), progress=False)
    emb = load_embeddings(result.path)
    assert os.fsdecode(b"train/red/caf\xe9.jpg") in emb.paths.tolist() and emb.ok.all()
    shown = invoke("predict", run, os.fsdecode(odd), "--csv", tmp_path / "p.csv")
    assert shown.exit_code == 0 and "caf\\xe9.jpg" in shown.output
    assert b"caf\xe9.jpg" in (tmp_path / "p.csv").read_bytes()


def test_8_csv_problems_are_one_line(tmp_path):
    for i in range(4):
        make_image(tmp_path / f"{i}.jpg", (30, 30, 30), seed=i)
    (tmp_path / "latin.csv").write_bytes("path,label\n0.jpg,caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.csv: not UTF-8 text \(byte 0xe9 at offset 20\); save the CSV as UTF-8"):
        scan_dataset(tmp_path / "latin.csv")
    (tmp_path / "nul.csv").write_bytes(b"path,label\n0.jpg,a\n1\x00.jpg,b\n")
    with pytest.raises(DataError, match=r"nul.csv:3: NUL byte in the row"):
        scan_dataset(tmp_path / "nul.csv")
    (tmp_path / "nolabel.csv").write_text("path\n0.jpg\n")
    with pytest.raises(DataError, match=r"nolabel.csv: the header must name the columns label, path"):
        scan_dataset(tmp_path / "nolabel.csv")


def test_8_unlabelled_rows_are_counted_and_a_file_of_only_them_is_refused(tiny_run, tmp_path):
    _, emb_path, _, _ = tiny_run
    unlabelled = Path(shutil.copy(emb_path, tmp_path / "unlabelled.h5"))
    with h5py.File(unlabelled, "r+") as handle:
        del handle.attrs["checksums"]  # as a CSV with empty labels gives it (labels -1), without re-extracting
        handle["labels"][:] = -1
    shown = invoke("info", unlabelled)
    assert shown.exit_code == 0 and "unlabelled" in shown.output
    one_line_error(invoke("compare", unlabelled), 2, "a head needs at least two")


def test_9_one_class_and_a_class_missing_from_train_are_refused(tmp_path):
    data = make_class_folders(tmp_path / "one", per_class=6)
    for name in ("green", "blue"):
        shutil.rmtree(data / name)
    one_line_error(invoke("advise", data, "--backbone", "resnet18", "--weights", "none"), 2, "fewer than two classes")
    from featx.finetuning.training import FinetuneConfig, Trainer

    with pytest.raises(DataError, match="one class; fine-tuning needs at least two"):
        Trainer(data, FinetuneConfig(backbone="resnet18", weights="none"), tmp_path / "ft")
    missing = Path(shutil.copy(FIXTURE, tmp_path / "missing.h5"))
    with h5py.File(missing, "r+") as handle:
        classes = json.loads(handle.attrs["classes"])
        handle.attrs["classes"] = json.dumps(classes + ["COVID"])
        labels = handle["labels"][:]
        split = handle["split"].asstr()[:]
        labels[np.flatnonzero(split == "test")[:3]] = 2  # three test rows of a class train never saw
        handle["labels"][:] = labels
    with pytest.raises(DataError, match="class COVID has test rows but no training rows"):
        compare([missing], ["logreg"])


def test_10_nan_features_tiny_files_and_uneven_columns(tmp_path):
    nan = Path(shutil.copy(FIXTURE, tmp_path / "nan.h5"))
    with h5py.File(nan, "r+") as handle:
        handle["features"][5, 0] = np.nan
    with pytest.raises(DataError, match=r"1 train rows hold NaN or infinite features .*--precision fp32"):
        compare([nan], ["logreg"])
    assert any("NaN or infinite" in line for line in invoke("doctor", nan).output.splitlines())
    tiny_file = tmp_path / "three.h5"
    with h5py.File(FIXTURE) as source, h5py.File(tiny_file, "w") as handle:
        for name in ("features", "labels", "ok"):
            handle[name] = source[name][[0, 100, 200]]  # one train row of each class, one test row
        for name in ("paths", "split", "errors"):
            handle.create_dataset(name, data=source[name][[0, 100, 200]], dtype=h5py.string_dtype())
        handle.attrs.update({k: v for k, v in source.attrs.items() if k != "checksums"})
    with pytest.raises(DataError, match="too few to carve a stratified 15% validation split"):
        compare([tiny_file], ["logreg"])
    uneven = Path(shutil.copy(FIXTURE, tmp_path / "uneven.h5"))
    with h5py.File(uneven, "r+") as handle:
        labels = handle["labels"][:-1]
        del handle["labels"]
        handle["labels"] = labels
    with pytest.raises(DataError, match="damaged file \\(columns of different lengths: features 280, labels 279"):
        load_embeddings(uneven)


def test_11_outputs_are_checked_before_the_work(tiny_run, tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("x")
    one_line_error(invoke("compare", FIXTURE, "--out", tmp_path / "a-file"), 2, "exists and is not a folder")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "thesis.tex").write_text("x")
    one_line_error(invoke("compare", FIXTURE, "--out", tmp_path / "elsewhere"), 2, "not a featx run folder")
    (tmp_path / "cut-short" / "heads").mkdir(parents=True)  # a save interrupted before run.json: taken back
    assert invoke("compare", FIXTURE, "--heads", "logreg", "--out", tmp_path / "cut-short").exit_code == 0
    assert (tmp_path / "cut-short" / "run.json").exists()
    data, _, run, _ = tiny_run
    image = next((data / "test" / "red").glob("*.jpg"))
    one_line_error(invoke("predict", run, image, "--csv", tmp_path / "missing" / "p.csv"), 2, "no such folder for --csv")

    def refuse(self, *args, **kwargs):  # a read-only folder (root ignores permissions, so it is simulated)
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    one_line_error(invoke("extract", data, *TINY, "--out", tmp_path / "readonly"), 2, "cannot write here",
                   "choose another --out")
    one_line_error(invoke("compare", FIXTURE, "--out", tmp_path / "ro-run"), 2, "cannot write a run here")


def test_12_damaged_run_folders_and_pickled_weights_are_one_line(tiny_run, tmp_path):
    import pickle

    _, _, run, _ = tiny_run
    image = next(Path(run).parent.rglob("*.jpg"))
    for damage, name in ((lambda f: f.write_text("{not json"), "best/open_set.json"),
                         (lambda f: f.unlink(), "leaderboard.json"), (lambda f: f.write_text("[]"), "run.json")):
        copy = Path(shutil.copytree(run, tmp_path / name.replace("/", "_")))
        damage(copy / name)
        result = invoke("report", copy) if name != "best/open_set.json" else invoke("predict", copy, image)
        one_line_error(result, 2, str(copy))
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"weights": shutil.rmtree}))
    sidecar = {"format": "featx.checkpoint/1", "backbone": "resnet18", "classes": ["a", "b"]}
    (tmp_path / "evil.json").write_text(json.dumps(sidecar))
    one_line_error(invoke("extract", tiny_run[0], "--checkpoint", tmp_path / "evil.pt", "--out", tmp_path / "c"), 2,
                   "evil.pt: its sidecar lacks preprocess")
    preprocess = get_backbone("resnet18").preprocess.as_dict()
    (tmp_path / "evil.json").write_text(json.dumps({**sidecar, "preprocess": preprocess}))
    one_line_error(invoke("extract", tiny_run[0], "--checkpoint", tmp_path / "evil.pt", "--out", tmp_path / "c"), 2,
                   "not a loadable checkpoint", "never pickled code")
    result = invoke("extract", tiny_run[0], "--backbone", "resnet18", "--weights", tmp_path / "evil.pt", "--out",
                    tmp_path / "c")
    one_line_error(result, 2, "not a loadable weights file")
    assert max(len(line) for line in result.output.splitlines()) < 400


# --- dropped without a word -------------------------------------------------------------------------------

def test_13_what_a_scan_leaves_out_is_listed_and_an_empty_class_folder_refused(tmp_path, monkeypatch):
    data = make_class_folders(tmp_path / "d", per_class=3)
    os.symlink(data / "red", data / "red" / "loop")
    os.symlink(tmp_path / "gone.jpg", data / "green" / "dangling.jpg")
    (data / "blue" / "private").mkdir()
    make_image(data / "blue" / "private" / "x.jpg", (30, 40, 200))
    (data / "empty").mkdir()
    real_scandir = os.scandir

    def no_permission(path="."):  # root reads everything, so the unreadable folder is simulated
        if str(path).endswith("private"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", no_permission)
    found = scan_dataset(data)
    reasons = {Path(path).name: why for path, why in found.skipped}
    assert reasons["loop"] == "symlink loop (a folder already scanned)"
    assert reasons["dangling.jpg"] == "dangling symlink"
    assert reasons["private"] == "unreadable folder (Permission denied)"
    assert reasons["empty"] == "no images in this folder: not a class"
    assert len(found) == 9
    result = invoke("extract", data, *TINY, "--out", tmp_path / "c")
    assert result.exit_code == 0 and "4 entries left out of the scan" in result.output
    split = make_class_folders(tmp_path / "s", per_class=2, splits=("train", "test"))
    (split / "test" / "purple").mkdir()
    with pytest.raises(DataError, match=r"test/purple: empty class folder \(no images\); add images or remove"):
        scan_dataset(split)


# --- beyond the list --------------------------------------------------------------------------------------

def test_doctor_reads_a_run_folder_and_names_what_to_do(tiny_run, tmp_path):
    _, _, run, _ = tiny_run
    healthy = invoke("doctor", run)
    assert healthy.exit_code == 0 and "healthy (run)" in healthy.output
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    (copy / "best" / "head.npz").unlink()
    sick = invoke("doctor", copy)
    assert sick.exit_code == 1 and "problem:" in sick.output and "head.npz" in sick.output


def test_configs_refuse_sensitivity_beyond_one():
    with pytest.raises(ConfigError, match="The 'threshold' parameter of compare"):
        compare([FIXTURE], ["logreg"], threshold="sensitivity=1.5")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compare([FIXTURE], ["logreg"], threshold="sensitivity=1.0")


# --- the whole CLI, every case: an exit code, one line, never a traceback ------------------------------------

@pytest.fixture(scope="module")
def mess(tmp_path_factory, tiny_run):
    """One file or folder per case above, made once."""
    root = tmp_path_factory.mktemp("mess")
    made = {}
    for name, content in {"latin": "path,label\n0.jpg,caf\xe9\n".encode("latin-1"),
                          "nul": b"path,label\n0.jpg,a\n1\x00.jpg,b\n", "nolabel": b"path\n0.jpg\n",
                          "twice": b"path,label\n0.jpg,a\n1.jpg,b\n0.jpg,b\n",
                          "outside": b"path,label\n0.jpg,a\n../1.jpg,b\n"}.items():
        folder = root / name
        for i in range(2):
            make_image(folder / f"{i}.jpg", (30, 30, 30), seed=i)
        (folder / "labels.csv").write_bytes(content)
        made[name] = folder / "labels.csv"
    odd = make_class_folders(root / "odd", per_class=3)
    Image.new("1", (8000, 7000)).save(odd / "red" / "huge.png")
    pixels = np.ones((32, 32), dtype=np.float32)
    pixels[0, 0] = np.inf
    Image.fromarray(pixels, mode="F").save(odd / "green" / "inf.tif")
    shutil.copy(odd / "blue" / "blue_00.jpg", os.fsencode(odd / "blue") + b"/\xff\xfe.jpg")
    made["odd"] = odd
    split = make_class_folders(root / "split", per_class=2, splits=("train", "test"))
    (split / "test" / "purple").mkdir()
    made["empty_class"] = split
    one = make_class_folders(root / "one", per_class=4, splits=("train", "val"))
    for part in ("train", "val"):
        for name in ("green", "blue"):
            shutil.rmtree(one / part / name)
    made["one_class"] = one
    nan = Path(shutil.copy(FIXTURE, root / "nan.h5"))
    with h5py.File(nan, "r+") as handle:
        handle["features"][7, 3] = np.inf
    made["nan"] = nan
    (root / "not.h5").write_text("hello")
    made["not_h5"] = root / "not.h5"
    return made


CASES = {  # case: (arguments, exit code, what the one line says)
    "csv latin-1": (lambda m, t: ["extract", m["latin"], *TINY], 2, "not UTF-8 text"),
    "csv NUL": (lambda m, t: ["extract", m["nul"], *TINY], 2, "NUL byte"),
    "csv no label column": (lambda m, t: ["extract", m["nolabel"], *TINY], 2, "must name the columns"),
    "csv duplicate": (lambda m, t: ["extract", m["twice"], *TINY], 2, "is listed again"),
    "csv outside": (lambda m, t: ["extract", m["outside"], *TINY], 2, "resolves outside"),
    "empty class folder": (lambda m, t: ["extract", m["empty_class"], *TINY], 2, "empty class folder"),
    "one class, fine-tune": (lambda m, t: ["finetune", m["one_class"], "--backbone", "resnet18", "--weights", "none",
                                           "--out", m["one_class"].parent / "ft"], 2, "at least two"),
    "one class, advise": (lambda m, t: ["advise", m["one_class"], "--backbone", "resnet18", "--weights", "none"], 2,
                          "fewer than two classes"),
    "NaN features": (lambda m, t: ["compare", m["nan"], "--heads", "logreg"], 2, "NaN or infinite"),
    "not HDF5": (lambda m, t: ["compare", m["not_h5"]], 2, "not an HDF5 file"),
    "heads ,": (lambda m, t: ["train", FIXTURE, "--head", ","], 2, "no heads given"),
    "cv below 2": (lambda m, t: ["compare", FIXTURE, "--cv", "1"], 2, "--cv"),
    "seed -1": (lambda m, t: ["extract", t[0], "--seed", "-1"], 2, "--seed"),
    "max-pixels 0": (lambda m, t: ["extract", t[0], "--max-pixels", "0"], 2, "--max-pixels"),
    "nothing to train": (lambda m, t: ["finetune", t[0], "--epochs", "0", "--unfreeze", "0"], 2, "nothing to train"),
    "predict into no folder": (lambda m, t: ["predict", t[2], t[0], "--csv", t[2] / "no" / "p.csv"], 2,
                               "no such folder for --csv"),
    "doctor on a stranger": (lambda m, t: ["doctor", m["not_h5"].parent], 2, "not something featx made"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_cli_answers_every_mistake_in_one_line(mess, tiny_run, case):
    build, code, fragment = CASES[case]
    one_line_error(invoke(*build(mess, tiny_run)), code, fragment)


def test_the_cli_goes_on_past_images_it_cannot_use_and_says_which(mess, tmp_path):
    result = invoke("extract", mess["odd"], *TINY, "--out", tmp_path / "c")
    assert result.exit_code == 0, result.output
    assert "red/huge.png: 8000×7000 = 56 Mpx is over the pixel budget" in result.output
    assert "green/inf.tif: 1 of 1024 pixels are NaN or infinite" in result.output
    emb = load_embeddings(next((tmp_path / "c").rglob("*.h5")))
    assert os.fsdecode(b"blue/\xff\xfe.jpg") in emb.paths_of().tolist()  # read, and its name kept to the byte
    shown = invoke("info", next((tmp_path / "c").rglob("*.h5")))
    assert shown.exit_code == 0 and "huge.png" in shown.output


# --- properties: whatever the CSV or the file names hold --------------------------------------------------

hypothesis = pytest.importorskip("hypothesis")  # in the test extra; skips only where someone runs without it
from hypothesis import given, settings, strategies as st  # noqa: E402

FILE_NAMES = st.binary(min_size=1, max_size=24).filter(lambda b: b"/" not in b and b"\0" not in b
                                                     and b not in (b".", b".."))
CSV_CELLS = st.one_of(st.text(max_size=12), st.sampled_from(["../x.jpg", "/etc/passwd", "a.jpg", "", '"', "\0",
                                                             "train", "val", "test", "café"]))


@settings(max_examples=40, deadline=None)
@given(rows=st.lists(st.lists(CSV_CELLS, min_size=0, max_size=5), max_size=6),
       header=st.sampled_from(["path,label", "path,label,split", "path,label,split,group", "label", ""]),
       junk=st.binary(max_size=40))
def test_any_csv_is_scanned_or_refused_in_one_line(rows, header, junk):
    import csv
    import io
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        buffer = io.StringIO()
        csv.writer(buffer).writerows(rows)
        (Path(tmp) / "labels.csv").write_bytes(header.encode() + b"\n" + buffer.getvalue().encode() + junk)
        try:
            found = scan_dataset(Path(tmp) / "labels.csv")
        except FeatxError as err:
            assert "\n" not in str(err).strip() and str(err).startswith(str(Path(tmp)))
            return
        assert all(not Path(s.path).is_absolute() and ".." not in Path(s.path).parts for s in found.samples)


@settings(max_examples=30, deadline=None)
@given(names=st.lists(FILE_NAMES, min_size=1, max_size=6, unique=True))
def test_any_file_names_are_scanned_and_stored_to_the_byte(names):
    import tempfile

    from featx.store.embeddings import EmbeddingWriter

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        for i, name in enumerate(names):
            folder = os.path.join(os.fsencode(root), b"a" if i % 2 else b"b")
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, name + b".jpg"), "wb") as handle:
                handle.write(b"\xff\xd8 not really a jpeg")
        try:
            found = scan_dataset(root, split="0.5,0.5")
        except FeatxError as err:  # e.g. every name hidden (a leading dot): no classes
            assert "\n" not in str(err).strip()
            return
        paths = [s.path for s in found.samples]
        writer = EmbeddingWriter(Path(tmp) / "e.h5", dim=2, paths=paths, labels=[s.label for s in found.samples],
                                 splits=[s.split for s in found.samples],
                                 attrs={"backbone": "toy", "classes": found.classes, "cache_key": "k",
                                        "dataset_root": str(root)}, dtype="float32")
        writer.write(np.zeros((len(paths), 2), np.float32), np.ones(len(paths), bool), [""] * len(paths))
        emb = load_embeddings(writer.finish())
        assert emb.paths.tolist() == paths
        assert all(os.path.exists(root / p) for p in emb.paths)
