"""Run folders as safe as the cache, inputs known by content, nothing dropped without a word (issue 40's
numbering). Each case failed before its fix."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest

from featx.comparison.evaluate import compare
from featx.comparison.runs import RUN_FILE, save_run, writing_run
from featx.errors import DataError
from featx.store.embeddings import load_embeddings
from tests.test_hardening import FIXTURE, invoke, one_line_error

hypothesis = pytest.importorskip("hypothesis")  # in the test extra
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402


@pytest.fixture(scope="module")
def boards():
    """Three leaderboards of the fixture, told apart by their heads."""
    return {name: compare([FIXTURE], heads) for name, heads in
            (("initial", ["logreg"]), ("a", ["knn"]), ("b", ["logreg", "knn"]))}


def whole_run(out: Path) -> list[str]:
    """The heads of the one run ``out`` holds, after checking that every file of it belongs to that run."""
    run = json.loads((out / RUN_FILE).read_text())
    heads = sorted(r["head"] for r in run["results"])
    assert sorted(r["head"] for r in json.loads((out / "leaderboard.json").read_text())) == heads
    assert sorted(p.name for p in (out / "heads").glob("*.json")) == sorted(Path(r["model"]).name
                                                                          for r in run["results"])
    assert json.loads((out / "best" / "chosen.json").read_text())["head"] in heads
    assert not list(out.parent.glob(f".{out.name}.*"))  # nothing half-written beside it
    return heads


# --- data lost ----------------------------------------------------------------------------------------------

def test_1_a_second_writer_of_a_run_folder_is_refused_while_the_first_holds_it(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom featx.comparison.runs import writing_run\n"
        f"with writing_run({str(out)!r}):\n    print('held', flush=True)\n    time.sleep(30)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        one_line_error(invoke("compare", FIXTURE, "--heads", "logreg", "--out", out), 2,
                       "another featx process is writing this run")
    finally:
        holder.kill()
        holder.wait(10)
    assert invoke("compare", FIXTURE, "--heads", "logreg", "--out", out).exit_code == 0  # a killed holder frees it


def _save_and_exit(board, out: Path) -> None:
    """A writer process: saves ``board``, or is refused because another one writes the folder."""
    try:
        save_run(board, out)
    except DataError:
        os._exit(3)
    os._exit(0)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(second_after=st.floats(0, 0.3), kill_after=st.one_of(st.none(), st.floats(0, 1.0)), kill_first=st.booleans())
def test_1_2_two_writers_and_a_kill_leave_the_old_run_or_a_new_one_never_a_mix(boards, second_after, kill_after,
                                                                                kill_first):
    out = Path(tempfile.mkdtemp()) / "run"
    try:
        save_run(boards["initial"], out)
        fork = multiprocessing.get_context("fork")
        writers = [fork.Process(target=_save_and_exit, args=(boards["a"], out))]
        writers[0].start()
        time.sleep(second_after)
        writers.append(fork.Process(target=_save_and_exit, args=(boards["b"], out)))
        writers[1].start()
        if kill_after is not None:
            time.sleep(kill_after)
            os.kill(writers[0 if kill_first else 1].pid, signal.SIGKILL)
        for writer in writers:
            writer.join(60)
            assert writer.exitcode is not None
        with writing_run(out):  # what the next featx command does first: finish or undo a save cut short
            pass
        assert whole_run(out) in (["logreg"], ["knn"], ["knn", "logreg"])
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)


def test_2_a_run_folder_without_its_run_json_is_refused_by_predict_and_named_by_doctor(tiny_run, tmp_path):
    run = Path(shutil.copytree(tiny_run.run, tmp_path / "run"))
    (run / RUN_FILE).unlink()  # what featx before this left after a SIGTERM: best/, plots/, predictions/
    image = next((tiny_run.data / "test" / "red").glob("*.jpg"))
    for target in (run, run / "best"):
        one_line_error(invoke("predict", target, image), 2, "no run.json: a run whose saving was cut short")
    sick = invoke("doctor", run)
    assert sick.exit_code == 1 and "holds featx's run files but no run.json" in sick.output


def test_3_an_interrupted_save_keeps_the_earlier_run_whole(boards, tmp_path, monkeypatch):
    out = tmp_path / "run"
    save_run(boards["initial"], out)
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the heads are written
        return real(*args, **kwargs)

    import featx.comparison.runs as runs

    real = runs.save_head
    monkeypatch.setattr(runs, "save_head", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_run(boards["b"], out)
    assert whole_run(out) == ["logreg"]
    # what a kill leaves: a staging folder beside the run (doctor names it), or, between the two renames, the
    # earlier run moved aside and no run in its place (the next writer puts it back)
    (tmp_path / ".run.partial-x" / "heads").mkdir(parents=True)
    sick = invoke("doctor", out)
    assert sick.exit_code == 1 and ".run.partial-x: left by a save that was cut short" in sick.output
    aside = tmp_path / ".run.replaced-x"
    aside.mkdir()
    os.replace(out, aside / "run")
    with writing_run(out):
        pass
    assert whole_run(out) == ["logreg"]
    assert invoke("compare", FIXTURE, "--heads", "svm", "--out", out).exit_code == 0
    assert whole_run(out) == ["svm"]


# --- silent wrong results -----------------------------------------------------------------------------------

def other_file(path: Path, key: str, noise: float = 1.5) -> Path:
    """A copy of the fixture under another cache key whose features tell the classes apart less well."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(FIXTURE, path)
    with h5py.File(path, "r+") as handle:
        handle.attrs["cache_key"] = key
        features = handle["features"][...].astype(np.float32)
        noisy = features + np.random.default_rng(0).normal(0, noise * features.std(), features.shape)
        handle["features"][...] = noisy.astype(handle["features"].dtype)
    return path


def test_4_two_inputs_of_one_file_name_are_told_apart_everywhere(tmp_path):
    first = Path(shutil.copy(FIXTURE, (tmp_path / "a").mkdir() or tmp_path / "a" / "e.h5"))
    second = other_file(tmp_path / "b" / "e.h5", "0123456789")
    out = tmp_path / "run"
    assert invoke("compare", first, second, "--heads", "logreg", "--out", out).exit_code == 0
    run = json.loads((out / RUN_FILE).read_text())
    files = sorted(r["file"] for r in run["results"])
    assert len(set(files)) == 2 and "e-0123456789.h5" in files
    for row in run["results"]:  # each row's head was trained on its own file's features
        head = json.loads((out / row["model"]).read_text())
        assert head["cache_key"] == row["cache_key"]
    scores = {r["file"]: r["test_accuracy"] for r in run["results"]}
    assert scores[files[0]] != scores[files[1]]
    best = json.loads((out / "best" / "chosen.json").read_text())
    assert (best["file"], best["head"]) in {(r["file"], r["head"]) for r in run["results"]}


def test_5_files_of_the_same_images_with_other_labels_are_not_joined(tmp_path):
    emb = load_embeddings(FIXTURE)
    labels = emb.labels_at().copy()
    labels[labels >= 0] = 1 - labels[labels >= 0]
    relabelled = replace(emb.with_labels(labels), path=tmp_path / "other.h5",
                         meta={**emb.meta, "cache_key": "0123456789"})
    for joined in ({"concat": True}, {"ensemble": True}):
        with pytest.raises(DataError, match=r"other.h5: labels differ from .* on \d+ rows \(e.g. "):
            compare([FIXTURE, relabelled], ["logreg"], **joined)


def test_6_split_fractions_must_be_finite_and_sum_to_one(tmp_path):
    from featx.data.datasets import scan_dataset
    from featx.errors import ConfigError
    from tests.conftest import make_class_folders

    data = make_class_folders(tmp_path / "d", per_class=4)
    for split in ("nan,nan,nan", "0.7,nan,0.3", "inf,0,0"):
        with pytest.raises(ConfigError, match="The 'split' parameter of scan_dataset must be train,val,test"):
            scan_dataset(data, split=split)
        one_line_error(invoke("extract", data, "--split", split), 2, "Invalid value for '--split'")


def test_7_a_file_replaced_in_place_with_its_size_and_modification_time_is_hashed_again(tmp_path):
    from featx.store.memo import file_sha256, remembered_sha256

    weights = tmp_path / "w.pt"
    weights.write_bytes(b"a" * 1000)
    first = remembered_sha256(weights)
    stat = weights.stat()
    time.sleep(0.01)
    weights.write_bytes(b"b" * 1000)  # same size; the old modification time put back
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert remembered_sha256(weights) == file_sha256(weights) != first


def test_8_a_12_bit_scan_in_a_16_bit_png_keeps_its_range(tmp_path):
    from PIL import Image

    from featx.data.images import open_rgb

    scan = (np.linspace(0, 4000, 64 * 64).reshape(64, 64)).astype(np.uint16)  # 12 bits stored in 16
    Image.fromarray(scan).save(tmp_path / "scan.png")  # mode I;16
    grey = np.asarray(open_rgb(tmp_path / "scan.png"))[..., 0]
    assert grey.max() >= 245 and len(np.unique(grey)) > 200  # was 15 at most, and 16 grey levels


def test_9_raster_formats_pillow_reads_are_scanned_and_other_files_listed(tmp_path):
    from PIL import features

    from featx.data.datasets import scan_dataset
    from tests.conftest import make_image

    for i, suffix in enumerate((".jpg", ".jfif", ".jpe")):
        for name in ("cat", "dog"):
            make_image(tmp_path / "d" / name / f"{i}{suffix}", (200, 30, 30), seed=i, fmt="JPEG")
    if features.check("avif"):
        make_image(tmp_path / "d" / "cat" / "9.avif", (200, 30, 30), fmt="AVIF")
    (tmp_path / "d" / "dog" / "notes.txt").write_text("x")
    found = scan_dataset(tmp_path / "d")
    assert len(found) == 6 + features.check("avif")
    assert ("not an image file name (.txt)") in dict((Path(p).name, why) for p, why in found.skipped).values()


def test_10_11_a_split_layout_is_read_from_its_top_level_and_lists_what_it_leaves_out(tmp_path):
    from featx.data.datasets import scan_dataset
    from tests.conftest import make_class_folders, make_image

    split = make_class_folders(tmp_path / "s", per_class=2, splits=("train", "test"))
    make_image(split / "extra" / "red" / "x.jpg", (200, 30, 30))
    make_image(split / "loose.jpg", (200, 30, 30))
    make_image(split / "train" / "loose.jpg", (200, 30, 30))
    found = scan_dataset(split)
    outside = "an image outside the train, val and test folders: left out"
    assert {Path(p).relative_to(split).as_posix(): why for p, why in found.skipped} == {
        "extra": "not a train, val or test folder: left out of the split layout",
        "loose.jpg": outside, "train/loose.jpg": outside}
    assert len(found) == 12 and found.split_source == "split folders"
    # a class named train beside other class folders, with sub-folders or flat
    for nested in (True, False):
        data = make_class_folders(tmp_path / f"c{nested}", per_class=3)
        for i in range(4):
            make_image(data / "train" / ("sub" if nested else "") / f"t{i}.jpg", (90, 90, 90), seed=i)
        found = scan_dataset(data)
        assert sorted(found.classes) == ["blue", "green", "red", "train"] and len(found) == 13


def test_12_a_repeated_csv_header_is_not_a_class(tmp_path):
    from featx.data.datasets import scan_dataset
    from tests.conftest import make_image

    for i in range(4):
        make_image(tmp_path / f"{i}.jpg", (30, 30, 30), seed=i)
    (tmp_path / "labels.csv").write_text("path,label\n0.jpg,cat\n1.jpg,dog\npath,label\n2.jpg,cat\n3.jpg,dog\n")
    found = scan_dataset(tmp_path / "labels.csv")
    assert found.classes == ["cat", "dog"] and len(found) == 4
    assert found.skipped == [(f"{tmp_path / 'labels.csv'}:4", "the header line again: not an image")]


def test_13_a_run_folder_inside_the_dataset_is_never_scanned(tmp_path):
    from tests.conftest import make_class_folders

    data = make_class_folders(tmp_path / "d", per_class=10)
    tiny = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32", "--out", tmp_path / "cache"]
    assert invoke("extract", data, *tiny).exit_code == 0
    assert invoke("compare", *(tmp_path / "cache").rglob("*.h5"), "--heads", "logreg", "--out", data / "run"
                  ).exit_code == 0
    again = invoke("extract", data, *tiny)
    assert again.exit_code == 0 and "30 images, 3 classes" in again.output and "nothing to do" in again.output
    assert "a featx run folder (run.json): not scanned" in again.output


def test_14_a_head_that_learnt_nothing_says_so(tmp_path, caplog):
    from tests.test_adapt import blobs, write_file

    rng = np.random.default_rng(0)
    X, y = blobs(rng, 16)
    file = write_file(tmp_path, X, y, ["train"] * 8 + ["val"] * 4 + ["test"] * 4)
    row = compare([file], ["lightgbm"]).rows[0]
    assert "8 training rows cannot be split into two leaves of 20" in caplog.text
    assert row["warning"].startswith("predicts ") and "for every validation image" in row["warning"]


def test_15_a_class_whose_images_are_all_unreadable_is_refused_before_any_head(tmp_path):
    from tests.conftest import make_class_folders

    data = make_class_folders(tmp_path / "d", per_class=4, splits=("train", "test"))
    for image in data.glob("*/blue/*.jpg"):
        image.write_bytes(b"not a jpeg")
    tiny = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32", "--out", tmp_path / "cache"]
    assert invoke("extract", data, *tiny).exit_code == 0
    file = next((tmp_path / "cache").rglob("*.h5"))
    one_line_error(invoke("compare", file, "--heads", "logreg"), 2,
                   "class blue has no readable training rows (8 of its images unreadable)")


def test_16_the_input_size_is_bounded(tmp_path):
    from featx.embed.planning import ExtractConfig
    from featx.errors import ConfigError

    with pytest.raises(ConfigError, match=r"The 'image_size' parameter of extract must be an int in \[16, 4096\]"):
        ExtractConfig(image_size=100_000)
    one_line_error(invoke("extract", tmp_path, "--image-size", "100000"), 2, "16<=x<=4096")


def test_17_names_with_control_characters_never_reach_the_terminal_raw(tiny_run, tmp_path):
    from tests.conftest import make_image

    evil = make_image(tmp_path / "evil\x1b]0;pwned\x07\u202egpj.jpg", (200, 30, 30))
    result = invoke("predict", tiny_run.run, evil)
    assert result.exit_code == 0 and "\x1b" not in result.output and "\u202e" not in result.output
    assert "evil\\x1b]0;pwned\\x07\\u202egpj.jpg" in result.output


def test_near_misses_before_the_work_and_no_leftovers(tiny_run, tmp_path, monkeypatch):
    from featx.embed.planning import ExtractConfig
    from featx.store.memo import remembered

    image = next((tiny_run.data / "test" / "red").glob("*.jpg"))
    one_line_error(invoke("predict", tiny_run.run, image, "--csv", ""), 2, "--csv '.': not a file name")
    assert Path(ExtractConfig(weights="w.pt").weights) == Path.cwd() / "w.pt"  # recorded usable from anywhere
    monkeypatch.setenv("FEATX_HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "memo.json").mkdir(parents=True)  # a memo that is a folder: nothing remembered, no litter
    assert remembered("k", lambda: "v") == "v" and not list((tmp_path / "home").glob("*.tmp"))
