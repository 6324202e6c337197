"""Decoding ahead of the model: the next batches are decoded by a background thread while the model embeds this
one, at most ``depth`` ahead. On a GPU they are put in pinned memory and copied to the device on a side stream,
so the copy overlaps the forward too; the model's stream waits for each batch's copy, never for the decoding.
"""

from __future__ import annotations

import queue
import threading

import torch

_DONE = object()


def prefetched(batches, device: torch.device, depth: int):
    """``batches`` (pixels, ok, errors) in their order, up to ``depth`` of them made ahead (0: none, made as asked);
    pixels already on ``device``. An error while making one is raised here, at its place in the order."""
    if depth <= 0:
        for images, ok, errors in batches:
            yield images.to(device, non_blocking=True), ok, errors
        return
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    side = torch.cuda.Stream(device) if device.type == "cuda" else None

    def offer(item) -> bool:
        """Put ``item`` in the queue, waiting while it is full; False once the consumer has gone."""
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def fill() -> None:
        try:
            for images, ok, errors in batches:
                copied = None
                if side is not None:
                    with torch.cuda.stream(side):
                        images = images.pin_memory().to(device, non_blocking=True)
                        copied = torch.cuda.Event()
                        copied.record(side)
                if not offer((images, ok, errors, copied)):
                    return
            offer(_DONE)
        except BaseException as err:  # raised in the consumer, at its place in the order
            offer(err)
        finally:
            getattr(batches, "close", lambda: None)()

    worker = threading.Thread(target=fill, name="featx-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            images, ok, errors, copied = item
            if copied is not None:
                current = torch.cuda.current_stream(device)
                current.wait_event(copied)
                images.record_stream(current)  # its memory is not reused before the model is done with it
            yield images, ok, errors
    finally:
        stop.set()
        worker.join()
