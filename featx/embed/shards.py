"""Extraction spread over a Dask cluster as shards: fixed row ranges, one task each, one published file.

Each shard is written like a whole file (``.partial``, checksummed batches, atomic rename) into
``<backbone>-<key>.shards/NNNNN.h5`` and resumes from its own ``rows_done``; finished shards are
skipped on a re-run, so after any failure only the missing work is done. Tasks get explicit row
ranges (no padding, no duplicates) and Dask's retries; a shard that keeps failing is reported with
its rows while the others finish. The workers must see the dataset and the cache at the same paths
(a shared filesystem).
"""

from __future__ import annotations

import atexit
import gc
import json
import logging
import math
import os
import socket
import time
from contextlib import ExitStack
from pathlib import Path

from featx.cluster import connect, describe, shard_slots
from featx.errors import ConfigError, DataError, FeatxError
from featx.embed.planning import ExtractConfig, ExtractResult, Plan, cached_result, plan_extraction
from featx.store.embeddings import SHARD_PLAN, CacheLock, check_intact, publish_shards, read_failures, rows_written

log = logging.getLogger(__name__)
SHARD_SECONDS = 60  # the largest shard is about a minute of one worker's work: small enough to lose
SMALLEST_SHARD_SECONDS = 2  # the last, smallest shards: still well above a task's own cost (~0.2 s)
ASSUMED_SPEED = {"cpu": 50, "cuda": 2000}  # images per second of one worker, for sizing shards before measuring
RETRIES = 2
POLL_SECONDS = 0.5  # how often the client looks at the shards' progress; it shares the workers' cores


def shard_ranges(n_rows: int, shard_rows: int) -> list[tuple[int, int]]:
    """Consecutive row ranges of ``shard_rows`` tiling ``0..n_rows``: each row in exactly one shard."""
    return [(start, min(start + shard_rows, n_rows)) for start in range(0, n_rows, shard_rows)]


def tapered_ranges(n_rows: int, slots: int, largest: int, smallest: int) -> list[tuple[int, int]]:
    """Consecutive row ranges tiling ``0..n_rows`` that shrink towards the end (factoring, Hummel et al. 1992).

    Each round gives every one of ``slots`` (the tasks the cluster runs at once) a shard of half the remaining
    rows' share, capped at ``largest`` and at least ``smallest``. Workers that run at different speeds (a shared
    core, a busier disk) then finish within about one small shard of each other, while the few large shards
    keep the per-task cost low.
    """
    ranges, start, slots = [], 0, max(slots, 1)
    while start < n_rows:
        size = max(smallest, min(largest, math.ceil((n_rows - start) / (2 * slots))))
        for _ in range(slots):
            stop = min(start + size, n_rows)
            if stop > start:  # the very last may be smaller than ``smallest``: the last shards should be the smallest
                ranges.append((start, stop))
            start = stop
    return ranges


def default_ranges(plan: Plan, slots: int) -> list[tuple[int, int]]:
    """Shards of at most about a minute of one worker's work, tapering to a few seconds' at the end."""
    speed = ASSUMED_SPEED["cuda" if plan.config.device.startswith("cuda") else "cpu"]
    return tapered_ranges(plan.n_rows, slots, largest=SHARD_SECONDS * speed, smallest=SMALLEST_SHARD_SECONDS * speed)


def recorded_ranges(plan: Plan, folder: Path, shard_rows: int | None) -> list[tuple[int, int]] | None:
    """The ranges an earlier run of this plan chose (when ``shard_rows`` asks for no other size), so resuming on
    another number of workers keeps its shards; None where there is no such record."""
    try:
        record = json.loads((folder / SHARD_PLAN).read_text())
    except (OSError, ValueError):
        return None
    if record.get("cache_key") != plan.key or (shard_rows and record.get("shard_rows") != shard_rows):
        return None
    ranges = [tuple(r) for r in record.get("ranges", [])]
    return ranges if ranges and ranges[-1][1] == plan.n_rows else None


def record_ranges(plan: Plan, folder: Path, ranges: list[tuple[int, int]], shard_rows: int | None) -> None:
    """Written before any shard, by a rename: a re-run finds the whole plan or none."""
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / (SHARD_PLAN + ".partial")
    temporary.write_text(json.dumps({"cache_key": plan.key, "shard_rows": shard_rows, "ranges": ranges}))
    os.replace(temporary, folder / SHARD_PLAN)


def shard_folder(path: Path) -> Path:
    return path.with_name(path.name.removesuffix(".h5") + ".shards")


def shard_key(plan: Plan, start: int, stop: int) -> str:
    """A shard's cache key carries its rows, so a shard of another plan is never taken for it."""
    return f"{plan.key}[{start}:{stop}]"


_MODELS: dict = {}  # in a worker process: the model of the extraction it is working on
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
ALLOCATOR_THRESHOLD = 256 * 2**20


def _allocate_for_tensors() -> None:
    """Undo the allocator setting Dask's nanny starts workers with (``MALLOC_TRIM_THRESHOLD_=65536``).

    Setting it also turns off glibc's dynamic mmap threshold, so every activation tensor over 128 KB is
    mapped and unmapped afresh: efficientnet_lite0's CPU forward ran at 26 instead of 60 img/s on one
    thread (measured, scripts/bench_cluster.py). Raising both thresholds again gives the speed back.
    Only glibc has ``mallopt``; elsewhere nothing is changed.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, ALLOCATOR_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, ALLOCATOR_THRESHOLD)
    except (OSError, AttributeError):
        pass


def run_shard(plan: Plan, index: int, path: Path, reuse: bool = True) -> dict:
    """One task: embed the plan's rows into the shard ``path`` (resuming it; with ``reuse``, copying the rows of
    images an earlier file of the recipe holds, ``embed_rows``); what a summary needs.

    A worker keeps the model of the last extraction it ran, so its next shards do not build it again.
    Only workers import the model side (torch): the client plans and publishes without it.
    """
    from featx.embed.extraction import embed_rows, load_model

    start, stop = plan.first_row, plan.n_rows
    began = time.perf_counter()
    if plan.key not in _MODELS:
        if not _MODELS:  # this worker's first model
            _allocate_for_tensors()
            atexit.register(gc.freeze)  # it exits ~1 s sooner (and its cluster closes sooner) once torch is in it
        _MODELS.clear()
        _MODELS[plan.key] = load_model(plan)
    result = embed_rows(plan, start, stop, path, extra_attrs={"shard_rows": [start, stop],
                                                               "cache_key": shard_key(plan, start, stop)},
                        loaded=_MODELS[plan.key], reuse=reuse)
    seconds = time.perf_counter() - began
    return {"index": index, "file": path.name, "rows": [start, stop], "seconds": round(seconds, 2),
            "images_per_second": round((stop - start - result.resumed_from - result.reused) / max(seconds, 1e-9), 1),
            "reused": result.reused, "worker": f"{socket.gethostname()}:{os.getpid()}", "failed": result.failed}


def _finished(path: Path, key: str) -> dict | None:
    """The attributes of a finished shard made for ``key``, if it exists and verifies; None to (re)do it."""
    if not path.exists():
        return None
    try:
        meta = check_intact(path)
    except DataError as err:
        log.warning("%s: %s; making it again", path.name, err)
        path.unlink()
        return None
    return meta if meta.get("cache_key") == key and meta["complete"] else None


def extract_on_cluster(data, config: ExtractConfig, address: str, *, shard_rows: int | None = None,
                       split: str | None = None, seed: int = 0, split_from=None, split_by: str = "shuffle",
                       progress: bool = True,
                       force: bool = False) -> ExtractResult:
    """``featx.extract`` as shards on the Dask cluster at ``address``; returns the published file's result."""
    if config.adapt_bn:
        raise ConfigError("--adapt-bn runs on one machine: every shard would estimate the statistics again; "
                          "leave out --cluster")
    began = time.perf_counter()
    plan = plan_extraction(data, config, split=split, seed=seed, split_from=split_from, split_by=split_by,
                           device_here=False)
    cached = None if force else cached_result(plan.path, plan.key)
    if cached:
        return cached
    folder = shard_folder(plan.path)
    gpu = plan.config.device.startswith("cuda")
    with CacheLock(plan.path), ExitStack() as cluster:
        if force:
            plan.path.unlink(missing_ok=True)
        client = None
        ranges = recorded_ranges(plan, folder, shard_rows)
        if not ranges:
            if shard_rows:
                ranges = shard_ranges(plan.n_rows, shard_rows)
            else:
                client = cluster.enter_context(connect(address, gpu=gpu))
                ranges = default_ranges(plan, shard_slots(client, gpu=gpu))
            record_ranges(plan, folder, ranges, shard_rows)
        paths = [folder / f"{index:05d}.h5" for index in range(len(ranges))]
        for stale in set(folder.glob("*.h5*")) - set(paths) - {p.with_name(p.name + ".partial") for p in paths}:
            stale.unlink()  # shards of an earlier plan of this key (another --shard-rows)
        done = {index: _finished(path, shard_key(plan, *ranges[index])) for index, path in enumerate(paths)}
        summary = {index: _summary_of(plan, index, paths[index], meta) for index, meta in done.items() if meta}
        todo = [index for index in range(len(ranges)) if not done[index]]
        rows_before = sum(ranges[i][1] - ranges[i][0] for i in summary)
        log.info("%s: %d shards of %d to %d rows; %d finished already, %d to do", plan.path.name, len(ranges),
                 min(b - a for a, b in ranges), max(b - a for a, b in ranges), len(summary), len(todo))
        failures, failed_images = [], [img for s in summary.values() for img in s.pop("failed_images")]
        if todo:
            client = client or cluster.enter_context(connect(address, gpu=gpu))
            log.info(describe(client))
            results = _submit(client, plan, ranges, paths, todo, progress, rows_before, reuse=not force)
            for index, outcome in results.items():
                if isinstance(outcome, BaseException):
                    failures.append((index, outcome))
                else:
                    failed_images += outcome.pop("failed")
                    summary[index] = outcome
        cluster.close()  # the workers are let go before publishing, which needs none of them
        if failures:
            index, err = failures[0]
            start, stop = ranges[index]
            raise FeatxError(f"{len(failures)} of {len(ranges)} shards failed after {RETRIES + 1} attempts, e.g. "
                             f"{paths[index].name} (rows {start}-{stop}): {type(err).__name__}: {str(err)[:200]}; "
                             f"the {len(ranges) - len(failures)} others are kept: run the same command again to do "
                             "only the missing ones")
        publish_shards(plan.path, paths, plan.n_rows, [summary[i] for i in sorted(summary)])
    return ExtractResult(path=plan.path, cached=False, rows=plan.n_rows, label=plan.source.label,
                         resumed_from=rows_before, seconds=time.perf_counter() - began, failed=failed_images,
                         reused=sum(summary[i].get("reused", 0) for i in todo if i in summary))


def _summary_of(plan: Plan, index: int, path: Path, meta: dict) -> dict:
    """The summary of a shard finished by an earlier run, from its own attributes and failures."""
    start, stop = meta["shard_rows"]
    seconds = float(meta.get("extract_seconds", 0.0))
    failed = [(name, why) for row, name, why in read_failures(path) if start + row < plan.n_images]
    return {"index": index, "file": path.name, "rows": [start, stop], "seconds": seconds,
            "images_per_second": round((stop - start) / seconds, 1) if seconds else 0.0,
            "worker": "an earlier run", "failed_images": failed}


def _submit(client, plan: Plan, ranges, paths, todo: list[int], progress: bool, rows_before: int,
            reuse: bool = True) -> dict:
    """One task per shard to do, each asking for a GPU when the plan runs on CUDA; outcome (or error) per shard."""
    from distributed import as_completed
    from tqdm.auto import tqdm

    gpu = {"GPU": 1} if plan.config.device.startswith("cuda") else None
    futures = {
        client.submit(run_shard, plan.part(*ranges[index]), index, paths[index], reuse,
                      key=f"featx-shard-{plan.key}-{index}",
                      retries=RETRIES, resources=gpu, pure=False): index
        for index in todo
    }
    outcomes: dict = {}
    with tqdm(total=plan.n_rows, initial=rows_before, unit="img", desc=plan.source.label, disable=not progress,
              dynamic_ncols=True) as bar:
        pending = as_completed(futures, with_results=False)
        while len(outcomes) < len(futures):
            for future in pending.next_batch(block=False) if pending.has_ready() else []:
                index = futures[future]
                try:
                    outcomes[index] = future.result()
                except Exception as err:  # a shard that kept failing: reported, the others go on
                    outcomes[index] = err
            if progress:
                bar.n = rows_before + sum(_rows_written(paths[i], ranges[i]) for i in todo)
                bar.refresh()
            time.sleep(POLL_SECONDS if len(outcomes) < len(futures) else 0)
    return outcomes


def _rows_written(path: Path, rows: tuple[int, int]) -> int:
    """How far a shard has got, read from its file (the workers share the filesystem)."""
    return rows[1] - rows[0] if path.exists() else rows_written(path.with_name(path.name + ".partial"))
