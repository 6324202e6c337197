"""What the cluster path costs, measured in one run on this machine.

1. Sharded extraction on a LocalCluster of 2 single-threaded workers against sequential extraction with
   2 threads (same images, same total threads), end to end including the cluster's start-up; and on a
   standing cluster of the same 2 workers (on loopback, started once, the model side imported).
2. Where a worker's core goes while it embeds: CPU time of its event loop (Dask's heartbeats, memory
   monitor and sampling profiler) against its shard's threads, with Dask's profile interval (10 ms) and
   featx's (100 ms), in one run.
3. Publishing as shards grow: writing the virtual file, opening it, reading it whole, and consolidate,
   for 10 / 100 / 1,000 shards, with the figures per million rows.

Usage: python scripts/bench_cluster.py [--images 2000] [--repeats 3] [--backbone efficientnet_lite0] [--skip-extraction]
       [--no-standing] [--skip-threads] [--skip-publishing] [--shard-rows N ...]
Uses ../shared/data/chest_xray when present (else synthetic 224 px JPEGs).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import click
import numpy as np

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "chest_xray"


def make_images(target: Path, count: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    sources = sorted((SHARED / "train").rglob("*.jpeg")) if SHARED.is_dir() else []
    for i in range(count):
        label = ("NORMAL", "PNEUMONIA")[i % 2]
        (target / label).mkdir(parents=True, exist_ok=True)
        if sources:
            shutil.copy(sources[int(rng.integers(len(sources)))], target / label / f"{i:05d}.jpeg")
        else:
            Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(target / label / f"{i:05d}.jpeg")
    return target


@contextmanager
def standing_cluster(folder: Path):
    """A scheduler and 2 single-threaded workers on loopback that have imported the model side already, as a
    cluster started once and used for many extractions is; stopped on leaving."""
    import json
    import subprocess

    file = folder / "scheduler.json"
    started = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                                 "--scheduler-file", str(file), "--dashboard-address", ":0"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.monotonic() + 60
        while not file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        started.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file",
                                         str(file), "--nworkers", "2", "--nthreads", "1", "--host", "127.0.0.1",
                                         "--preload", "featx.embed.extraction"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        address = json.loads(file.read_text())["address"]
        from distributed import Client

        with Client(address, timeout="60s") as client:
            client.wait_for_workers(2, timeout=120)
        yield address
    finally:
        for process in reversed(started):
            process.terminate()
            process.wait(timeout=30)


def extraction(data: Path, images: int, backbone: str, root: Path, repeats: int, standing: bool = True,
               shard_rows: tuple[int, ...] = ()) -> None:
    """As a user runs them: `featx extract` in a fresh process, wall clock, same images and 2 cores.

    The ways alternate, ``repeats`` times each, and the median ratio is reported: on this shared VM one
    run's ratio wanders by ±0.2 (measured), more than the difference being looked for. For the cluster
    runs the tail is reported too: how long one worker sat idle at the end, out of shards, while the
    other finished its last; shards that shrink towards the end shorten it.
    """
    import subprocess

    with standing_cluster(root) if standing else nullcontext() as address:
        runs = {"sequential, 2 threads": [],
                "--cluster local:2 (2 workers × 1 thread)": ["--cluster", "local:2"]}  # default shards: shrinking
        for rows in shard_rows:
            runs[f"--cluster local:2 --shard-rows {rows}"] = ["--cluster", "local:2", "--shard-rows", str(rows)]
        if standing:
            runs["--cluster tcp:// (the same, standing)"] = ["--cluster", address]
        seconds = {name: [] for name in runs}
        tails = {name: [] for name in runs}
        for repeat in range(repeats):
            for name, extra in runs.items():
                out = root / f"out{len(seconds[name])}-{list(runs).index(name)}"
                began = time.perf_counter()
                subprocess.run([shutil.which("featx") or "featx", "-q", "extract", str(data), "--backbone",
                                backbone, "--out", str(out), *extra], check=True, capture_output=True)
                seconds[name].append(time.perf_counter() - began)
                if extra:
                    tails[name].append(idle_tail(next(out.rglob("*.h5"))))
                shutil.rmtree(out)
    print(f"extraction of {images} images, {backbone}, `featx extract` end to end in a fresh process, "
          f"{repeats} alternating runs each:")
    for name, values in seconds.items():
        tail = f"; idle tail {', '.join(f'{t:.1f}' for t in tails[name])} s" if tails[name] else ""
        print(f"  {name:42s}: " + ", ".join(f"{v:5.1f}" for v in values) +
              f" s  (median {images / np.median(values):5.1f} img/s){tail}")
    sequential, *clustered = seconds
    for name in clustered:
        ratios = [c / s for s, c in zip(seconds[sequential], seconds[name])]
        print(f"  {name.split(' (')[0]} / sequential, run by run = " + ", ".join(f"{r:.2f}" for r in ratios) +
              f"; median {np.median(ratios):.2f}; ratio of the median times "
              f"{np.median(seconds[name]) / np.median(seconds[sequential]):.2f}")


def idle_tail(published: Path) -> float:
    """Seconds between the first worker finishing its last shard and the last worker finishing: how long one
    worker sat idle at the end, from the finished shards' modification times (each lands by an atomic rename)."""
    import json

    import h5py

    from featx.embed.shards import shard_folder

    with h5py.File(published, "r") as handle:
        shards = json.loads(handle.attrs["shards"])
    folder = shard_folder(published)
    last = {}
    for shard in shards:
        last[shard["worker"]] = max(last.get(shard["worker"], 0.0), (folder / shard["file"]).stat().st_mtime)
    return max(last.values()) - min(last.values()) if len(last) > 1 else 0.0


def thread_shares(data: Path, backbone: str, root: Path, window: float = 8.0) -> None:
    """CPU time per thread of each worker of a running `featx extract --cluster local:2`, over ``window`` seconds
    once its shards are being written: the event loop (the main thread) against the shard's threads."""
    import subprocess

    import psutil

    print(f"CPU per worker while embedding, {window:g}-s window, `featx extract --cluster local:2`:")
    # "0.01s" is Dask's 10 ms spelled as a user would, which featx keeps (it replaces only Dask's own default)
    for name, interval in (("Dask's profile interval, 10 ms", "0.01s"), ("featx's, 100 ms", None)):
        out = root / "threads"
        env = {**os.environ, "DASK_DISTRIBUTED__WORKER__PROFILE__INTERVAL": interval} if interval else None
        client = subprocess.Popen([shutil.which("featx") or "featx", "-q", "extract", str(data), "--backbone", backbone,
                                   "--out", str(out), "--cluster", "local:2"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while not list(out.rglob("*.partial")) and client.poll() is None:
                time.sleep(0.2)
            time.sleep(2.0)  # past the first batches
            workers = [p for p in psutil.Process(client.pid).children(recursive=True)
                       if "spawn_main" in " ".join(p.cmdline())]

            def cpu(worker) -> dict:
                return {t.id: t.user_time + t.system_time for t in worker.threads()}

            before = {worker.pid: cpu(worker) for worker in workers}
            time.sleep(window)
            for worker in workers:
                spent = {tid: now - before[worker.pid].get(tid, 0.0) for tid, now in cpu(worker).items()}
                loop = spent.pop(worker.pid, 0.0)  # the main thread runs the event loop
                print(f"  {name:32s} worker {worker.pid}: event loop {100 * loop / window:4.1f} % of a core, "
                      f"shard threads {100 * sum(spent.values()) / window:5.1f} %")
        finally:
            client.wait(timeout=600)
            shutil.rmtree(out, ignore_errors=True)


def publishing(root: Path, rows_per_shard: int = 100, dim: int = 1280) -> None:
    from featx.store.embeddings import EmbeddingWriter, consolidate, load_embeddings, publish_shards

    print(f"publishing ({rows_per_shard} rows × {dim} float16 per shard):")
    print("  shards    rows   publish s   open s   read s  consolidate s  read after s   per million rows: "
          "read virtual / consolidate / read after")
    for shards in (10, 100, 1000):
        folder = root / f"pub{shards}" / "e.shards"
        folder.mkdir(parents=True)
        paths = []
        for k in range(shards):
            start = k * rows_per_shard
            writer = EmbeddingWriter(folder / f"{k:05d}.h5", dim=dim, paths=[f"{start + i}.jpg" for i in
                                                                            range(rows_per_shard)],
                                     labels=[i % 2 for i in range(rows_per_shard)], splits=["train"] * rows_per_shard,
                                     attrs={"backbone": "bench", "classes": ["a", "b"], "cache_key": f"k[{k}]",
                                            "shard_rows": [start, start + rows_per_shard]})
            writer.write(np.full((rows_per_shard, dim), k, np.float16), np.ones(rows_per_shard, bool),
                         [""] * rows_per_shard)
            paths.append(writer.finish())
        n = shards * rows_per_shard
        target = folder.parent / "e.h5"
        began = time.perf_counter()
        publish_shards(target, paths, n, [])
        publish = time.perf_counter() - began
        import h5py

        began = time.perf_counter()
        with h5py.File(target, "r") as handle:
            handle["features"][0]  # opening resolves the first source: the cost of a first look
        open_s = time.perf_counter() - began
        began = time.perf_counter()
        load_embeddings(target)
        read = time.perf_counter() - began
        began = time.perf_counter()
        consolidate(target)
        merge = time.perf_counter() - began
        began = time.perf_counter()
        load_embeddings(target)
        after = time.perf_counter() - began
        scale = 1e6 / n
        print(f"  {shards:6d} {n:7d} {publish:11.2f} {open_s:8.3f} {read:8.2f} {merge:14.2f} {after:12.2f}   "
              f"{read * scale:6.1f} s / {merge * scale:6.1f} s / {after * scale:6.1f} s")


@click.command()
@click.option("--images", default=2000, show_default=True)
@click.option("--backbone", default="efficientnet_lite0", show_default=True)
@click.option("--repeats", default=3, show_default=True, help="Alternating runs of each way of extracting.")
@click.option("--skip-extraction", is_flag=True)
@click.option("--no-standing", is_flag=True, help="Leave out the standing cluster (shorter runs, more pairs).")
@click.option("--skip-threads", is_flag=True, help="Leave out the CPU time per worker thread.")
@click.option("--skip-publishing", is_flag=True)
@click.option("--shard-rows", type=int, multiple=True, help="Also run local:2 with shards of this many rows "
              "(repeatable), against its default size.")
def main(images, backbone, repeats, skip_extraction, no_standing, skip_threads, skip_publishing, shard_rows):
    from featx.embed.hardware import cpu_model

    print(f"{cpu_model()}, {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        data = make_images(Path(tmp) / "images", images) if not (skip_extraction and skip_threads) else None
        if not skip_extraction:
            extraction(data, images, backbone, Path(tmp), repeats, standing=not no_standing, shard_rows=shard_rows)
        if not skip_threads:
            thread_shares(data, backbone, Path(tmp))
        if not skip_publishing:
            publishing(Path(tmp))


if __name__ == "__main__":
    main()
