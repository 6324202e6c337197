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


def cluster_address(address: str | None) -> str | None:
    """The address asked for (or ``$FEATX_CLUSTER``), checked; None: run in this process."""
    address = address or os.environ.get(ENV) or None
    check("cluster", cluster=address)
    return address


@contextmanager
def connect(address: str):
    """A Dask ``Client`` for ``address``; a LocalCluster started here is closed on leaving."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise ConfigError("--cluster needs Dask distributed: pip install 'featx[cluster]'") from None
    local = re.fullmatch(r"local(?::(\d+))?", address)
    if local:
        workers = int(local.group(1) or os.cpu_count() or 1)
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
            with Client(cluster) as client:
                yield client
        return
    try:
        client = Client(address, timeout="20s")
    except OSError as err:
        raise ConfigError(f"no Dask scheduler answers at {address} ({err}); start one with `dask scheduler`") from None
    with client:
        yield client


def describe(client) -> str:
    """One line for the user: how many workers, and where the dashboard is."""
    workers = client.scheduler_info().get("workers", {})
    threads = sum(w.get("nthreads", 0) for w in workers.values())
    link = client.dashboard_link
    return f"Dask: {len(workers)} workers, {threads} threads" + (f"; dashboard {link}" if link else "")
