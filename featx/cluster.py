"""Connecting to Dask distributed, the engine featx spreads work over (``pip install "featx[cluster]"``).

``local`` or ``local:N`` starts a LocalCluster of N single-threaded worker processes on this machine;
``tcp://host:8786`` joins a running scheduler (``dask scheduler`` / ``dask worker``, dask-jobqueue on
SLURM, dask-kubernetes). ``FEATX_CLUSTER`` gives the address when no option does. No torch here.
"""

from __future__ import annotations

import logging
import os
import re
from contextlib import contextmanager

from featx.errors import ConfigError
from featx.vocab import check

log = logging.getLogger(__name__)
ENV = "FEATX_CLUSTER"
# 1.0: a worker is handed its next shard when it finishes one, so a faster worker takes more of them (Dask's
# default 1.1 hands a single-threaded worker two at once, fixing the split early)
SATURATION = "distributed.scheduler.worker-saturation"


def cluster_address(address: str | None) -> str | None:
    """The address asked for (or ``$FEATX_CLUSTER``), checked; None: run in this process."""
    address = address or os.environ.get(ENV) or None
    check("cluster", cluster=address)
    return address


@contextmanager
def connect(address: str):
    """A Dask ``Client`` for ``address``; a LocalCluster started here is closed on leaving."""
    try:
        import dask
        from distributed import Client, LocalCluster
    except ImportError:
        raise ConfigError("--cluster needs Dask distributed: pip install 'featx[cluster]'") from None
    # Dask's own INFO lines (workers starting, comms closing) are noise to a featx user; -vv shows them
    logging.getLogger("distributed").setLevel(logging.INFO if log.isEnabledFor(logging.DEBUG) else logging.WARNING)
    local = re.fullmatch(r"local(?::(\d+))?", address)
    if local:
        workers = int(local.group(1) or os.cpu_count() or 1)
        with dask.config.set({SATURATION: 1.0}), LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                                              dashboard_address=":0") as cluster:
            with Client(cluster) as client:
                yield client
        return
    try:
        client = Client(address, timeout="20s")
    except OSError as err:
        raise ConfigError(f"no Dask scheduler answers at {address} ({err}); start one with `dask scheduler`") from None
    with client:
        yield client


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
