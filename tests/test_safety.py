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


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
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
    # a kill between the two renames: the earlier run moved aside, the new one complete beside it
    aside = tmp_path / ".run.replaced-x"
    aside.mkdir()
    os.replace(out, aside / "run")
    sick = invoke("doctor", out.parent / ".run.replaced-x")
    assert sick.exit_code in (1, 2)
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
