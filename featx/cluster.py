"""Connecting to Dask distributed, the engine featx spreads work over (``pip install "featx[cluster]"``).

``local`` or ``local:N`` starts a LocalCluster of N single-threaded worker processes on this machine;
``tcp://host:8786`` joins a running scheduler (``dask scheduler`` / ``dask worker``, dask-jobqueue on
SLURM, dask-kubernetes). ``FEATX_CLUSTER`` gives the address when no option does. For GPU work a local
cluster has one worker per GPU, each seeing only its own. No torch here.
"""

from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path

from featx.errors import ConfigError
from featx.vocab import check

log = logging.getLogger(__name__)
ENV = "FEATX_CLUSTER"
# 1.0: a worker is handed its next shard when it finishes one, so a faster worker takes more of them (Dask's
# default 1.1 hands a single-threaded worker two at once, fixing the split early)
SATURATION = "distributed.scheduler.worker-saturation"
# Dask's sampling profiler looks at a busy worker's stack every 10 ms from its event loop, which then took
# 5-6 % of each single-threaded worker's core, 2.5-2.7 % at every 100 ms (scripts/bench_cluster.py, 2 cores).
# 100 ms keeps the dashboard's profile; an interval the user set is kept.
PROFILE_INTERVAL, DASK_PROFILE_INTERVAL, FEATX_PROFILE_INTERVAL = "distributed.worker.profile.interval", "10ms", "100ms"


def cluster_address(address: str | None) -> str | None:
    """The address asked for (or ``$FEATX_CLUSTER``), checked; None: run in this process."""
    address = address or os.environ.get(ENV) or None
    check("cluster", cluster=address)
    return address


@contextmanager
def connect(address: str, gpu: bool = False):
    """A Dask ``Client`` for ``address``; a LocalCluster started here is closed on leaving. ``gpu``: the tasks
    each want a ``GPU`` resource, so a local cluster gets GPU workers and a remote one must have some."""
    try:
        import dask
        from distributed import Client, LocalCluster
    except ImportError:
        raise ConfigError("--cluster needs Dask distributed: pip install 'featx[cluster]'") from None
    # Dask's own INFO lines (workers starting, comms closing) are noise to a featx user; -vv shows them
    logging.getLogger("distributed").setLevel(logging.INFO if log.isEnabledFor(logging.DEBUG) else logging.WARNING)
    local = re.fullmatch(r"local(?::(\d+))?", address)
    if local:
        workers = int(local.group(1)) if local.group(1) else None
        settings = {SATURATION: 1.0}
        if dask.config.get(PROFILE_INTERVAL) == DASK_PROFILE_INTERVAL:
            settings[PROFILE_INTERVAL] = FEATX_PROFILE_INTERVAL
        with dask.config.set(settings), (
                local_gpu_cluster(workers) if gpu else
                LocalCluster(n_workers=workers or os.cpu_count() or 1, threads_per_worker=1, processes=True,
                             dashboard_address=":0")) as cluster:
            with Client(cluster) as client:
                yield client
        return
    try:
        client = Client(address, timeout="20s")
    except OSError as err:
        raise ConfigError(f"no Dask scheduler answers at {address} ({err}); start one with `dask scheduler`") from None
    with client:
        if gpu and not shard_slots(client, gpu=True):
            # the tasks would wait for ever for a resource no worker offers
            raise ConfigError(f"no worker of the Dask cluster at {address} offers a GPU; start one per GPU with "
                              f"`CUDA_VISIBLE_DEVICES=N dask worker {address} --nthreads 1 --resources GPU=1`")
        yield client


def visible_gpus() -> list[str]:
    """The CUDA device ids this process may use (``CUDA_VISIBLE_DEVICES`` where set), from the driver's own
    listing so that the client need not import torch; [] without an NVIDIA driver."""
    listing = Path("/proc/driver/nvidia/gpus")
    count = sum(1 for _ in listing.iterdir()) if listing.is_dir() else len(list(Path("/dev").glob("nvidia[0-9]*")))
    if not count:
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [gpu.strip() for gpu in listed.split(",") if gpu.strip()]
    return [str(index) for index in range(count)]


def local_gpu_cluster(workers: int | None):
    """One single-threaded worker process per visible GPU (or ``workers`` of them, GPUs taken in turn), each
    seeing only its own GPU and offering one ``GPU`` resource: what dask-cuda's LocalCUDACluster does."""
    from distributed import Nanny, Scheduler, SpecCluster

    gpus = visible_gpus()
    if not gpus:
        raise ConfigError("--device cuda --cluster local needs a CUDA GPU on this machine, and none is visible")
    spec = {index: {"cls": Nanny, "options": {"nthreads": 1, "resources": {"GPU": 1},
                                              "env": {"CUDA_VISIBLE_DEVICES": gpus[index % len(gpus)]}}}
            for index in range(workers or len(gpus))}
    return SpecCluster(workers=spec, scheduler={"cls": Scheduler, "options": {"dashboard_address": ":0"}})


def shard_slots(client, gpu: bool = False) -> int:
    """How many tasks the cluster runs at once: its worker threads, or its GPUs for tasks that each want one."""
    workers = client.scheduler_info().get("workers", {}).values()
    if gpu:
        return int(sum(w.get("resources", {}).get("GPU", 0) for w in workers))
    return sum(w.get("nthreads", 0) for w in workers)


def describe(client) -> str:
    """One line for the user: how many workers, and where the dashboard is."""
    workers = client.scheduler_info().get("workers", {})
    threads = shard_slots(client)
    link = client.dashboard_link
    return f"Dask: {len(workers)} workers, {threads} threads" + (f"; dashboard {link}" if link else "")
