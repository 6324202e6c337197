"""Sharded extraction and parallel heads on Dask distributed: a LocalCluster of 2 single-threaded worker processes on
loopback, a tiny random-weight backbone, generated images."""

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")  # the cluster extra; CI installs it with the test extra

from featx.cluster import connect  # noqa: E402
from featx.errors import ConfigError, DataError  # noqa: E402
from featx.embed.extraction import ExtractConfig, extract  # noqa: E402
from featx.embed.shards import default_ranges, extract_on_cluster, shard_folder  # noqa: E402
from featx.store.embeddings import consolidate, load_embeddings, publish_shards  # noqa: E402
from tests.conftest import make_class_folders  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "chest_xray_efficientnet_lite0.h5"


class Sabotage(distributed.WorkerPlugin):
    """Test-only: kills a worker process the first time it starts a chosen shard, or slows every shard down."""

    def __init__(self, marker: str, kill_shard: int | None = None, delay: float = 0.0):
        self.marker, self.kill_shard, self.delay = marker, kill_shard, delay

    def transition(self, key, start, finish, **kwargs):
        if finish != "executing" or not str(key).startswith("featx-shard-"):
            return
        if self.delay:
            time.sleep(self.delay)
        if self.kill_shard is not None and str(key).endswith(f"-{self.kill_shard}") and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)  # as hard as a worker dies: no cleanup, the nanny restarts it


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as local, distributed.Client(local) as client:
        yield local.scheduler_address, client


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = make_class_folders(tmp_path_factory.mktemp("shards") / "colours", per_class=16,
                              splits=("train", "val", "test"))
    (root / "train" / "red" / "empty.jpg").write_bytes(b"")  # unreadable rows must shard the same way
    return root


@pytest.fixture(scope="module")
def sequential(data, tmp_path_factory):
    config = ExtractConfig(backbone="resnet18", weights="none", image_size=48, batch_size=8, augment=1, aug="xray",
                           cache_dir=str(tmp_path_factory.mktemp("seq")))
    return config, load_embeddings(extract(data, config, progress=False).path)


def same_rows(a, b) -> None:
    for column in ("paths", "splits", "ok", "errors"):
        assert getattr(a, column).tolist() == getattr(b, column).tolist(), column
    np.testing.assert_array_equal(a.labels_at(), b.labels_at())
    np.testing.assert_allclose(a.features_at(), b.features_at(), rtol=1e-3, atol=1e-3)  # float16 storage


@pytest.mark.slow  # the default run keeps sharded = sequential rows through the reuse and consolidate tests
def test_shards_give_the_sequential_rows(cluster, data, sequential, tmp_path):
    address, _ = cluster
    config, whole = sequential
    result = extract_on_cluster(data, replace(config, cache_dir=str(tmp_path)), address, shard_rows=50,
                                progress=False)
    sharded = load_embeddings(result.path)
    assert len(list(shard_folder(result.path).glob("*.h5"))) == 4  # 194 rows: 145 images, a copy of each of 49
    assert sharded.meta["cache_key"] == whole.meta["cache_key"] and len(sharded.meta["shards"]) == 4
    same_rows(sharded, whole)
    assert [p for p, _ in result.failed] == ["train/red/empty.jpg"]
    again = extract_on_cluster(data, replace(config, cache_dir=str(tmp_path)), address, shard_rows=50, progress=False)
    assert again.cached


def test_shards_copy_the_rows_an_earlier_file_holds_and_embed_the_rest(cluster, data, sequential, tmp_path):
    address, _ = cluster
    config, whole = sequential
    config = replace(config, cache_dir=str(tmp_path / "cache"))
    earlier = shutil.copytree(data, tmp_path / "earlier" / "colours")
    (earlier / "train" / "blue" / "blue_03.jpg").unlink()
    extract(earlier, config, progress=False)  # the dataset before blue_03 was added
    result = extract_on_cluster(data, config, address, shard_rows=50, progress=False)
    # blue_03's augmented copy is embedded; its own row is reused from val/blue_03, an image of the same pixels
    assert result.reused == whole.meta["n_rows"] - 1
    same_rows(load_embeddings(result.path), whole)


@pytest.mark.slow  # test_shards_give_the_sequential_rows covers shards; views in shards ~9 s
def test_test_time_views_give_the_sequential_rows_in_shards(cluster, data, sequential, tmp_path):
    """--tta-views draws its views once for every image, so shards of any size embed a row as one process does."""
    address, _ = cluster
    config = replace(sequential[0], tta_views=2, cache_dir=str(tmp_path / "one"))
    whole = load_embeddings(extract(data, config, progress=False).path)
    sharded = load_embeddings(extract_on_cluster(data, replace(config, cache_dir=str(tmp_path / "shards")), address,
                                                 shard_rows=37, progress=False).path)
    same_rows(sharded, whole)
    assert not np.allclose(whole.features_at(), sequential[1].features_at(), rtol=1e-2, atol=1e-2)


def test_a_worker_that_dies_mid_shard_loses_no_row(cluster, data, sequential, tmp_path):
    address, client = cluster
    client.register_plugin(Sabotage(str(tmp_path / "killed"), kill_shard=1), name="sabotage")
    try:
        result = extract_on_cluster(data, replace(sequential[0], cache_dir=str(tmp_path)), address, shard_rows=50,
                                    progress=False)
    finally:
        client.unregister_worker_plugin("sabotage")
    assert (tmp_path / "killed").exists()  # the worker really died once
    same_rows(load_embeddings(result.path), sequential[1])


CLIENT = """
import sys
from featx.embed.extraction import ExtractConfig
from featx.embed.shards import extract_on_cluster
config = ExtractConfig(backbone="resnet18", weights="none", image_size=48, batch_size=8, augment=1, aug="xray",
                       cache_dir=sys.argv[3])
if __name__ == "__main__":
    extract_on_cluster(sys.argv[1], config, sys.argv[2], shard_rows=20, progress=False)
"""


@pytest.mark.slow  # ~6 s; test_shards_give_the_sequential_rows keeps shards in the default run
def test_a_shard_asked_for_decoding_processes_decodes_with_threads_in_a_daemonic_dask_worker(cluster, data,
                                                                                           sequential, tmp_path):
    # DataLoader workers (the GPU default) cannot start inside a Dask worker process: every shard failed on a GPU
    address, _ = cluster
    config = replace(sequential[0], workers=2, cache_dir=str(tmp_path))
    result = extract_on_cluster(data, config, address, shard_rows=50, progress=False)
    same_rows(load_embeddings(result.path), sequential[1])


@pytest.mark.slow  # ~7 s; test_extract's killed extraction keeps resuming in the default run
def test_a_killed_client_is_resumed_by_doing_only_the_missing_shards(cluster, data, sequential, tmp_path):
    address, client = cluster
    client.register_plugin(Sabotage(str(tmp_path / "unused"), delay=0.8), name="slow")  # slow shards: time to kill
    try:
        child = subprocess.Popen([sys.executable, "-c", CLIENT, str(data), address, str(tmp_path)])
        folder = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and child.poll() is None:
            folder = next(tmp_path.rglob("*.shards"), None)
            if folder and len(list(folder.glob("*.h5"))) >= 2:
                break
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        client.unregister_worker_plugin("slow")
    time.sleep(1.5)  # shards the scheduler had already started may still land
    finished = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.h5")}
    assert 2 <= len(finished) < 10
    # No --shard-rows: the default for 2 worker threads would be 25 rows, but the earlier run's 20 are kept
    result = extract_on_cluster(data, replace(sequential[0], cache_dir=str(tmp_path)), address, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.h5") if p.name in finished} == finished
    assert len(list(folder.glob("*.h5"))) == 10 and result.resumed_from >= 20 * (len(finished) - 1)
    same_rows(load_embeddings(result.path), sequential[1])


def test_default_shards_tile_the_rows_stay_under_a_minute_and_shrink_towards_the_end():
    def plan(rows, device="cpu"):
        return SimpleNamespace(n_rows=rows, config=SimpleNamespace(device=device))

    def sizes(ranges):
        assert [a for a, _ in ranges] == [0] + [b for _, b in ranges[:-1]]  # consecutive: no gap, no overlap
        return [b - a for a, b in ranges]

    assert sizes(default_ranges(plan(2000), slots=2)) == [500, 500, 250, 250, 125, 125, 100, 100, 50]
    many = sizes(default_ranges(plan(10**6), slots=2))
    assert sum(many) == 10**6 and max(many) == 3000 and many[-3:] == [100, 100, 12]  # a minute / 2 s at 50 img/s
    gpus = sizes(default_ranges(plan(10**8, "cuda:0"), slots=64))
    assert sum(gpus) == 10**8 and max(gpus) == 120_000 and min(gpus[:-1]) == 4000  # at 2,000 img/s on a GPU
    assert sizes(default_ranges(plan(3), slots=0)) == [3]  # a cluster whose workers have not joined yet


def test_gpu_shards_are_refused_where_no_worker_offers_a_gpu_instead_of_waiting_for_ever(cluster, data, sequential,
                                                                                       tmp_path, monkeypatch):
    address, _ = cluster
    config = replace(sequential[0], device="cuda", cache_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="offers a GPU"):
        extract_on_cluster(data, config, address, shard_rows=50, progress=False)
    monkeypatch.setattr("featx.cluster.visible_gpus", lambda: [])
    with pytest.raises(ConfigError, match="none is visible"):
        extract_on_cluster(data, config, "local:1", progress=False)
    assert not list(tmp_path.rglob("*.h5"))


def test_a_local_gpu_cluster_pins_one_gpu_to_each_worker(monkeypatch):
    monkeypatch.setattr("featx.cluster.visible_gpus", lambda: ["3", "5"])
    with connect("local:3", gpu=True) as client:
        pinned = client.run(lambda: os.environ["CUDA_VISIBLE_DEVICES"])
        offered = [w["resources"] for w in client.scheduler_info()["workers"].values()]
    assert sorted(pinned.values()) == ["3", "3", "5"] and offered == [{"GPU": 1}] * 3


def test_a_local_cluster_samples_the_profile_every_100_ms_unless_the_user_chose_an_interval():
    import dask

    from featx.cluster import PROFILE_INTERVAL

    def interval():
        return dask.config.get(PROFILE_INTERVAL)

    with connect("local:1") as client:
        assert list(client.run(interval).values()) == ["100ms"]
    with dask.config.set({PROFILE_INTERVAL: "20ms"}), connect("local:1") as client:
        assert list(client.run(interval).values()) == ["20ms"]


def test_a_missing_shard_is_never_published_and_consolidate_gives_the_same_file(cluster, data, sequential, tmp_path):
    address, _ = cluster
    result = extract_on_cluster(data, replace(sequential[0], cache_dir=str(tmp_path)), address, shard_rows=50,
                                progress=False)
    shards = sorted(shard_folder(result.path).glob("*.h5"))
    with pytest.raises(DataError, match=r"rows 50-100 are missing before 00002.h5"):
        publish_shards(tmp_path / "other.h5", [shards[0], *shards[2:]], 194, [])
    with pytest.raises(DataError, match="the shards end at row 150, not 194"):
        publish_shards(tmp_path / "other.h5", shards[:3], 194, [])
    virtual = load_embeddings(result.path)
    consolidate(result.path)
    merged = load_embeddings(result.path)
    assert not shard_folder(result.path).exists()
    same_rows(merged, virtual)
    np.testing.assert_array_equal(merged.features_at(), virtual.features_at())


def test_the_cli_extracts_on_a_cluster_and_info_shows_the_shards(cluster, data, tmp_path):
    from click.testing import CliRunner

    from featx.cli.commands import main

    address, _ = cluster
    args = ["extract", str(data), "--backbone", "resnet18", "--weights", "none", "--image-size", "48",
            "--out", str(tmp_path), "--cluster", address, "--shard-rows", "50"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    published = next(tmp_path.rglob("*.h5"))
    shown = CliRunner().invoke(main, ["info", str(published)])
    assert "3 shards (a virtual file over" in shown.output and "00002.h5  100-145" in shown.output
    refused = CliRunner().invoke(main, ["extract", str(data), "--shard-rows", "10"])
    assert refused.exit_code == 2 and "--shard-rows needs --cluster" in refused.output


def same_leaderboard(a, b) -> None:
    """The same heads, parameters and order; values equal but for the last bits of float sums (workers run BLAS
    with one thread, so a kNN distance may be summed in another order)."""
    for x, y in zip(a.rows, b.rows, strict=True):
        for key in set(x) | set(y):
            if key in ("fit_s", "predict_s"):
                continue
            if isinstance(x[key], float):
                assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-12), key
            else:
                assert x[key] == y[key], key


def test_compare_on_the_cluster_gives_the_sequential_leaderboard(cluster):
    from featx.comparison.evaluate import compare

    address, _ = cluster
    heads = ["logreg", "knn"]
    same_leaderboard(compare([FIXTURE], heads, threshold="balanced_accuracy"),
                     compare([FIXTURE], heads, threshold="balanced_accuracy", cluster=address))


@pytest.mark.slow  # ~8 s; test_compare_on_the_cluster and the out-of-core test keep the cluster heads in the default run
def test_lightgbm_on_the_cluster_gives_the_sequential_leaderboard(cluster):
    """Large enough for BLAS to thread its sums (1,500 × 512): with two threads here and one on the workers,
    lightgbm's bins moved and it tuned another num_leaves, until both ways fitted with one thread."""
    from featx.comparison.evaluate import compare
    from featx.store.embeddings import Embeddings

    address, _ = cluster
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 1500)
    features = rng.normal(size=(3, 512))[labels] * 0.06 + rng.normal(size=(1500, 512))
    splits = np.array(["train"] * 900 + ["val"] * 300 + ["test"] * 300)
    emb = Embeddings(Path("blobs.h5"), {"backbone": "test", "cache_key": "k"}, ["a", "b", "c"],
                     np.array([f"{i}.jpg" for i in range(1500)]), splits, np.ones(1500, bool), np.array([""] * 1500),
                     features.astype(np.float16), labels)
    same_leaderboard(compare([emb], ["lightgbm"]), compare([emb], ["lightgbm"], cluster=address))


def test_lightgbm_out_of_core_learns_as_well_as_in_memory(cluster, tmp_path):
    from featx.comparison.evaluate import compare
    from featx.comparison.runs import load_run, save_run

    address, _ = cluster
    in_memory = compare([FIXTURE], ["lightgbm"]).rows[0]
    board = compare([FIXTURE], ["lightgbm"], cluster=address, out_of_core=True)
    spread = board.rows[0]
    assert "out of core on all 170 training rows (Dask, 2 workers" in spread["note"]
    assert spread["test_roc_auc"] >= in_memory["test_roc_auc"] - 0.05
    assert spread["test_accuracy"] >= in_memory["test_accuracy"] - 0.05
    run = load_run(save_run(board, tmp_path / "run"))  # a head saved and reloaded the safe way, open set and all
    assert run.info["config"]["out_of_core"] is True and (tmp_path / "run" / "best" / "open_set.npz").exists()
    with pytest.raises(DataError, match=r"svm keep every training row in memory .* --max-train-rows N"):
        compare([FIXTURE], ["svm", "lightgbm"], cluster=address, out_of_core=True)


def test_max_train_rows_is_a_stratified_sample_recorded_with_the_run(tmp_path):
    from featx.comparison.evaluate import compare, subsample_train
    from featx.comparison.runs import load_run, save_run

    y = np.repeat([0, 1], [60, 140])
    kept = subsample_train(y, 50, seed=0)
    assert len(kept) == 50 and np.bincount(y[kept]).tolist() == [15, 35]
    board = compare([FIXTURE], ["logreg"], max_train_rows=60)
    assert load_run(save_run(board, tmp_path / "run")).info["config"]["max_train_rows"] == 60


def test_a_csv_of_urls_is_read_where_the_images_are(cluster, tmp_path):
    from featx.data.datasets import scan_dataset
    from tests.conftest import make_image

    address, _ = cluster
    store = tmp_path / "bucket"  # stands for object storage: nothing below the CSV's folder
    lines = ["path,label,split"]
    for i, (name, colour) in enumerate([("red", (200, 30, 30)), ("blue", (30, 40, 200))] * 6):
        image = make_image(store / f"{name}{i}.jpg", colour, seed=i)
        lines.append(f"{image.as_uri()},{name},{'train' if i < 8 else 'test'}")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "labels.csv").write_text("\n".join(lines) + "\n")
    by_path = tmp_path / "local"
    for line in lines[1:]:
        url, name, split = line.split(",")
        target = by_path / split / name / Path(url).name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(Path(url.removeprefix("file://")).read_bytes())
    config = ExtractConfig(backbone="resnet18", weights="none", image_size=48, batch_size=4,
                           cache_dir=str(tmp_path / "cache"))
    remote = load_embeddings(extract_on_cluster(tmp_path / "data" / "labels.csv", config, address, shard_rows=5,
                                                progress=False).path)
    local = load_embeddings(extract(by_path, config, progress=False).path)
    assert remote.ok.all() and remote.paths[0].startswith("file://")
    order = np.argsort([Path(p).name for p in remote.paths])
    np.testing.assert_allclose(remote.features_at(order), local.features_at(np.argsort([Path(p).name for p in local.paths])),
                               rtol=1e-3, atol=1e-3)
    before = scan_dataset(tmp_path / "data" / "labels.csv").fingerprint()
    make_image(store / "red0.jpg", (10, 200, 10), size=(64, 64), seed=99)
    assert scan_dataset(tmp_path / "data" / "labels.csv").fingerprint() != before
