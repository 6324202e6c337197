"""Decoding ahead of the model: the same batches in the same order, errors where they happened, a consumer that
stops early stops the decoding thread, and extraction gives the same rows whatever the depth."""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest
import torch

from featx.embed.extraction import extract
from featx.embed.prefetch import prefetched
from featx.store.embeddings import load_embeddings

CPU = torch.device("cpu")


def batches(count: int, fail_at: int | None = None):
    for k in range(count):
        if k == fail_at:
            raise OSError(f"batch {k} unreadable")
        yield torch.full((2, 3, 4, 4), k, dtype=torch.uint8), torch.tensor([True, True]), ["", ""]


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_the_same_batches_in_order(depth):
    assert [int(images[0, 0, 0, 0]) for images, _, _ in prefetched(batches(7), CPU, depth)] == list(range(7))


def test_an_error_is_raised_at_its_place():
    seen = []
    with pytest.raises(OSError, match="batch 3 unreadable"):
        for images, _, _ in prefetched(batches(6, fail_at=3), CPU, 2):
            seen.append(int(images[0, 0, 0, 0]))
    assert seen == [0, 1, 2]


def test_a_consumer_that_stops_stops_the_thread():
    before = threading.active_count()
    stream = prefetched(batches(1000), CPU, 2)
    next(stream)
    stream.close()
    assert threading.active_count() == before


def test_extraction_rows_do_not_depend_on_the_depth(image_folder, tiny_config, tmp_path):
    config = replace(tiny_config, precision="fp32")
    rows = [load_embeddings(extract(image_folder, replace(config, prefetch=depth, cache_dir=str(tmp_path / str(depth))),
                                    progress=False).path).features_at() for depth in (0, 2)]
    assert np.array_equal(*rows)
