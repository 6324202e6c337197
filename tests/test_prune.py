"""The cache cleans up after itself: ``featx ls`` marks superseded files and ``featx prune`` removes them, stale
partial files, orphan shards and stale memo entries, only with --yes, and never a file a run folder uses."""

from __future__ import annotations

import shutil

import h5py
import pytest
from click.testing import CliRunner

from featx.cli.commands import main
from featx.comparison.evaluate import compare
from featx.comparison.runs import save_run
from featx.embed.extraction import ExtractConfig, extract
from featx.store.memo import remembered_sha256, stale_entries
from featx.store.prune import plan_prune, superseded
from tests.conftest import make_class_folders, make_image


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A cache holding a file of a dataset and a newer one of the same dataset with an image added."""
    root = tmp_path_factory.mktemp("prune")
    data = make_class_folders(root / "colours", per_class=4, splits=("train", "val", "test"))
    config = ExtractConfig(backbone="resnet18", weights="none", image_size=48, batch_size=8, precision="fp32",
                           cache_dir=str(root / "cache"))
    old = extract(data, config, progress=False).path
    make_image(data / "train" / "red" / "added.jpg", (240, 20, 20), seed=7)
    new = extract(data, config, progress=False).path
    return root, old, new


def grown_cache(made, tmp_path):
    """A copy of that cache (times kept) for one test to change."""
    root, old, new = made
    cache = shutil.copytree(root / "cache", tmp_path / "cache")
    config = ExtractConfig(backbone="resnet18", weights="none", image_size=48, cache_dir=str(cache))
    return root / "colours", config, cache / old.relative_to(root / "cache"), cache / new.relative_to(root / "cache")


def test_ls_marks_and_prune_removes_a_superseded_file_only_with_yes(made, tmp_path):
    _, config, old, new = grown_cache(made, tmp_path)
    assert superseded(config.cache_dir) == {old: new}
    listed = CliRunner().invoke(main, ["ls", config.cache_dir])
    assert f"superseded by {new.name}" in listed.output
    dry = CliRunner().invoke(main, ["prune", config.cache_dir])
    assert dry.exit_code == 0 and f"would remove {old}" in dry.output and "run again with --yes" in dry.output
    assert old.exists()
    done = CliRunner().invoke(main, ["prune", config.cache_dir, "--yes"])
    assert done.exit_code == 0 and f"removed {old}" in done.output and "freed" in done.output
    assert not old.exists() and new.exists()
    assert "nothing to prune" in CliRunner().invoke(main, ["prune", config.cache_dir]).output


def test_a_file_a_run_uses_is_kept_until_the_run_is_gone(made, tmp_path):
    _, config, old, new = grown_cache(made, tmp_path)
    save_run(compare([old], ["logreg"]), tmp_path / "runs" / "first")
    found = plan_prune(config.cache_dir)
    assert not found.removals and found.kept[0][0] == old and "runs/first uses it" in found.kept[0][1]
    shutil.rmtree(tmp_path / "runs" / "first")
    found = plan_prune(config.cache_dir)
    assert {r.path for r in found.removals} >= {old} and any(".runs" in str(r.path) for r in found.removals)


def test_runs_saved_elsewhere_are_kept_when_named(made, tmp_path):
    _, config, old, _ = grown_cache(made, tmp_path)
    save_run(compare([old], ["logreg"]), tmp_path / "runs" / "first")
    shutil.rmtree(old.parent / ".runs")  # as a run saved before featx registered runs
    assert plan_prune(config.cache_dir).removals
    assert not plan_prune(config.cache_dir, [tmp_path / "runs"]).removals


def test_stale_partials_orphan_shards_and_memo_entries(made, tmp_path):
    _, config, old, new = grown_cache(made, tmp_path)
    partial = old.with_name("resnet18-0123456789.h5.partial")  # an unfinished extraction of the older images
    shutil.copy(old, partial)
    with h5py.File(partial, "r+") as handle:
        handle.attrs["complete"] = False
        handle.attrs["created"] = "2026-01-01T00:00:00+00:00"  # begun before the newer file
    orphan = new.with_name(new.stem + ".shards") / "00000.h5"  # left by a consolidated cluster extraction
    orphan.parent.mkdir()
    shutil.copy(new, orphan)
    gone = tmp_path / "gone.bin"
    gone.write_bytes(b"x")
    remembered_sha256(gone)
    gone.unlink()
    found = plan_prune(config.cache_dir)
    why = {r.path: r.why for r in found.removals}
    assert "supersedes" in why[partial] and "a shard no file reads" in why[orphan]
    assert any(str(gone) in key for key in found.memo)
    CliRunner().invoke(main, ["prune", config.cache_dir, "--yes"])
    assert not partial.exists() and not orphan.exists() and new.exists()
    assert not any(str(gone) in key for key in stale_entries())


def test_a_file_kept_outside_the_cache_gets_nothing_written_beside_it(made, tmp_path):
    _, config, old, _ = grown_cache(made, tmp_path)
    fixture = shutil.copy(old, tmp_path / "fixture.h5")  # as a test fixture or a colleague's copy is named
    save_run(compare([fixture], ["logreg"]), tmp_path / "run")
    assert not (tmp_path / ".runs").exists()
