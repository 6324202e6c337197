"""Running a backbone once over a dataset and writing its embeddings to the HDF5 cache.

Images are decoded while the model runs; rows are written in dataset order as batches finish,
so a killed run resumes at ``rows_done`` and ends with the same rows as an uninterrupted one.
What to run and where the file goes is planned, without torch, in ``featx.embed.planning``.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from featx.data.augment import augmentation, copy_seed, fixed_views, seeded
from featx.data.datasets import ImageDataset
from featx.errors import ConfigError
from featx.embed.feature_model import (adapt_batchnorm, autocast, build_feature_model, embed, gpu_decoding_workers,
                                 optimise_for_cpu, resolve_device, to_tensor)
from featx.data.images import ImageError, Preprocess, load_image
from featx.embed.planning import (ADAPT_BN_BATCH, ExtractConfig, ExtractResult, Plan, adaptation_sample, cached_result,
                            plan_extraction)
from featx.store.embeddings import AUGMENTED, CHUNK_ROWS, CacheLock, EmbeddingWriter
from featx.store.reuse import ReusableRows, earlier_files
from featx.embed.prefetch import prefetched

log = logging.getLogger(__name__)
# Batches decoded ahead by default. On 2 CPU cores decoding ahead competes with the forward for the same cores:
# b/a 0.59 with none ahead, 0.64 with one, 0.58 with two (AMD EPYC, lite0 fp32, one run of scripts/bench_extract.py
# --prefetch; within the run-to-run spread), so a CPU keeps decoding between forwards.
PREFETCH = {"cpu": 0, "cuda": 2}
NON_FINITE = "features were NaN or infinite (overflow in reduced precision?); try --precision fp32"


class ImageRows(torch.utils.data.Dataset):
    """Decoded uint8 CHW tensors of ``rows``; unreadable files give zeros and their reason.

    ``files[0]`` is row ``first_row``: rows are numbered as in the whole extraction. Rows from ``first_copy`` on
    are augmented copies, each seeded by its ``contents`` (its image's hash and copy index), so a copy is the same
    whether it is embedded in one run, resumed, cut into shards or reused from an earlier file.
    """

    def __init__(self, files: list[Path], preprocess: Preprocess, rows, first_copy: int, transform=None,
                 first_row: int = 0, contents: list[str] = ()):
        self.files, self.preprocess, self.rows = files, preprocess, list(rows)
        self.first_copy, self.transform, self.first_row, self.contents = first_copy, transform, first_row, contents

    def __len__(self) -> int:
        return len(self.rows)

    def file(self, i: int) -> Path:
        return self.files[self.rows[i] - self.first_row]

    def copied(self, i: int, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels`` of row ``rows[i]`` transformed as its copy is, if it is one."""
        row = self.rows[i]
        if row < self.first_copy:
            return pixels
        return seeded(self.transform, pixels, copy_seed(self.contents[row - self.first_row]))

    def __getitem__(self, i: int):
        try:
            pixels = self.copied(i, to_tensor(load_image(self.file(i), self.preprocess)))
            return pixels, True, ""
        except ImageError as err:
            size = self.preprocess.size
            return torch.zeros(3, size, size, dtype=torch.uint8), False, str(err)


def extract(
    data: ImageDataset | str | Path,
    config: ExtractConfig = ExtractConfig(),
    *,
    split: str | None = None,
    seed: int = 0,
    split_from: str | Path | None = None,
    split_by: str = "shuffle",
    progress: bool = True,
    force: bool = False,
) -> ExtractResult:
    """Embed every image of ``data`` with ``config.backbone`` into an HDF5 file, or find it cached.

    A cached file is used only once it verifies; ``force`` re-extracts it anyway (over a damaged one).
    """
    return extract_planned(plan_extraction(data, config, split=split, seed=seed, split_from=split_from,
                                           split_by=split_by),
                           progress=progress, force=force)


def extract_planned(plan: Plan, *, progress: bool = True, force: bool = False) -> ExtractResult:
    """``extract`` of a plan made already (the CLI plans without torch, to answer a cache hit at once)."""
    cached = None if force else cached_result(plan.path, plan.key)
    if cached:
        return cached
    with CacheLock(plan.path):
        cached = None if force else cached_result(plan.path, plan.key)  # another process may have finished it
        if cached:
            return cached
        if force:
            plan.path.unlink(missing_ok=True)
        return embed_rows(plan, 0, plan.n_rows, plan.path, progress=progress, reuse=not force)


@dataclass
class LoadedModel:
    """A plan's feature model, built on the machine that runs it, with its device and feature size."""

    model: torch.nn.Module
    device: torch.device
    dim: int


def load_model(plan: Plan, adapt_to: str | None = None) -> LoadedModel:
    """Build the plan's model here, with the precision the plan recorded; frozen for a CPU in fp32.

    ``adapt_to`` (a split, with ``--adapt-bn``): BatchNorm statistics re-estimated on that split's images first.
    """
    spec, device = plan.source.spec, resolve_device(plan.config.device)
    model = build_feature_model(spec, plan.source.weights, ",".join(plan.layers),
                                plan.source.backbone_state()).to(device)
    if adapt_to is not None:
        files = _adaptation_images(plan, adapt_to)
        rows = ImageRows(files, plan.preprocess, range(len(files)), len(files))
        # Large, shuffled batches: the layers below each BatchNorm run on batch statistics meanwhile, and small or
        # one-class batches would skew what the layers above see.
        batches = _batches(rows, replace(plan.config, batch_size=max(plan.config.batch_size, ADAPT_BN_BATCH)), device)
        readable = (images[ok].to(device) for images, ok, _ in batches if ok.any())
        seen = adapt_batchnorm(model, readable)
        log.info("BatchNorm statistics of %r re-estimated on %d of its images", adapt_to, seen)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every batch has one shape: cuDNN's fastest kernels, found once
    dim = spec.dim if plan.layers == ("penultimate",) else _probe_dim(model, plan.preprocess, device)
    if device.type == "cpu":
        model = optimise_for_cpu(model, plan.preprocess.size, plan.precision)
    return LoadedModel(model, device, dim)


def embed_rows(plan: Plan, start: int, stop: int, path: Path, *, progress: bool = False, extra_attrs: dict | None = None,
               loaded: LoadedModel | None = None, reuse: bool = True) -> ExtractResult:
    """Embed rows ``start:stop`` of ``plan`` into ``path`` (resuming its ``.partial``): the whole file, or a shard.

    With ``reuse``, rows of images that an earlier file of the same recipe holds (``featx.store.reuse``) are copied
    from it, and only new or changed images are embedded; with ``--adapt-bn`` every row is embedded, since a
    split's features depend on all of its images. ``loaded`` reuses a model built for this plan (a worker running several shards
    builds it once).
    """
    config = plan.config
    contents = plan.row_contents(start, stop)
    reused = _earlier_rows(plan) if reuse else None
    models = _ModelsBySplit(plan) if config.adapt_bn else None
    if reused and all(c in reused for c in contents):
        device, dim = torch.device("cpu"), reused.dim()  # nothing to embed: no model to build
    else:
        loaded = loaded or (models.first() if models else load_model(plan))
        device, dim = loaded.device, loaded.dim
    samples = plan.samples[start - plan.first_row:stop - plan.first_row]
    writer = EmbeddingWriter(
        path, dim=dim, paths=[s.path for s in samples], labels=[s.label for s in samples],
        splits=[s.split for s in samples], attrs={**plan.attrs(str(device)), **(extra_attrs or {})}, dtype=config.dtype,
        contents=contents,
    )
    transform = augmentation(config.aug, plan.preprocess.size) if config.augment else None
    files = [plan.dataset.absolute_path(s) for s in samples]
    first = start + writer.rows_done
    todo = [row for row in range(first, stop) if not reused or contents[row - start] not in reused]
    segments = [(loaded.model if todo else None,
                 ImageRows(files, plan.preprocess, todo, plan.n_images, transform, start, contents))]
    if models:  # one model per split; rows in file order, a new segment wherever the split changes
        segments = [(models.of(split).model, ImageRows(files, plan.preprocess, range(begin, end), plan.n_images,
                                                       transform, start, contents))
                    for split, begin, end in _split_runs(plan, first, stop)]
    if reused:
        log.info("%s: %d of %d rows reused from %s; embedding %d new or changed", path.name, stop - first - len(todo),
                 stop - first, ", ".join(p.name for p in reused.files), len(todo))
    try:
        return _run(segments, plan, writer, start, device, progress, reused, contents[first - start:])
    finally:
        writer.close()
        if reused:
            reused.close()


def _earlier_rows(plan: Plan) -> ReusableRows | None:
    """The rows of earlier files of this recipe, by content; None where there are none or the plan cannot reuse."""
    earlier = earlier_files(plan.path, plan.recipe, None if plan.config.out else plan.config.cache_dir)
    if plan.config.adapt_bn:
        if earlier:
            log.info("--adapt-bn: each split's features depend on all of its images, so every row is embedded "
                     "again (no rows reused from earlier files)")
        return None
    reused = ReusableRows(earlier)
    return reused if reused.files else None


class _ModelsBySplit:
    """With ``--adapt-bn``, one model per split, built once (augmented copies use train's)."""

    def __init__(self, plan: Plan):
        self.plan, self.built = plan, {}

    def of(self, split: str) -> LoadedModel:
        split = "train" if split == AUGMENTED else split
        if split not in self.built:
            self.built[split] = load_model(self.plan, adapt_to=split)
        return self.built[split]

    def first(self) -> LoadedModel:
        return self.of(self.plan.samples[0].split if self.plan.samples else "train")


def _adaptation_images(plan: Plan, split: str) -> list[Path]:
    """``split``'s images whose statistics its model takes (never their labels)."""
    own = [s for s in plan.dataset.samples if s.split == split]
    if not own:
        raise ConfigError(f"--adapt-bn: no images of split {split!r} to estimate its statistics from")
    return [plan.dataset.absolute_path(sample) for sample in adaptation_sample(own)]


def _split_runs(plan: Plan, start: int, stop: int) -> list[tuple[str, int, int]]:
    """Rows ``start:stop`` cut where the split changes: (split, first row, end row)."""
    runs = []
    for row in range(start, stop):
        split = plan.samples[row - plan.first_row].split
        split = "train" if split == AUGMENTED else split
        if runs and runs[-1][0] == split:
            runs[-1][2] = row + 1
        else:
            runs.append([split, row, row + 1])
    return [tuple(run) for run in runs]


def _run(segments, plan: Plan, writer, offset: int, device, progress, reused: ReusableRows | None = None,
         contents: list[str] = ()) -> ExtractResult:
    """Write rows from ``writer.rows_done`` on: each segment's rows embedded with its model, and with ``reused``
    the rows it holds (``contents`` names them) copied in between. ``writer``'s first row is the plan's ``offset``."""
    from tqdm.auto import tqdm

    n_images = plan.n_images  # later rows are copies, whose failures repeat their source's

    def path_of(row: int) -> str:
        return plan.samples[row - plan.first_row].path

    resumed_from = writer.rows_done
    failed: list[tuple[str, str]] = []
    began = time.perf_counter()
    bar = tqdm(total=writer.n_rows, initial=resumed_from, unit="img", desc=writer.label, disable=not progress,
               dynamic_ncols=True)
    with torch.inference_mode(), autocast(device, plan.precision), bar:
        blocks = _embedded(segments, plan, device)
        if reused:  # written a chunk at a time: a batch at a time, writing reused rows cost more than reading them
            blocks = _with_reused(blocks, reused, contents, max(plan.config.batch_size, CHUNK_ROWS))
        for features, ok, errors in blocks:
            row = offset + writer.rows_done
            failed += [(path_of(row + i), e) for i, e in enumerate(errors) if e and row + i < n_images]
            writer.write(features, ok, list(errors))
            bar.update(len(features))
            if failed:
                bar.set_postfix(failed=len(failed))
    seconds = time.perf_counter() - began
    if resumed_from:  # the earlier run's failures are in the file; report every row, not just this run's
        failed = [(path_of(offset + i), reason) for i, reason in writer.failures() if offset + i < n_images]
    path = writer.finish({"extract_seconds": round(seconds, 3), "failed": len(failed)})
    if failed:
        log.warning("%d of %d images could not be read and were skipped (recorded in 'errors')",
                    len(failed), writer.n_rows)
    reused_rows = sum(c in reused for c in contents) if reused else 0
    return ExtractResult(path=path, cached=False, rows=writer.n_rows, label=writer.label, resumed_from=resumed_from,
                         seconds=seconds, failed=failed, reused=reused_rows)


def _embedded(segments, plan: Plan, device):
    """``(features, ok, errors)`` of each segment's rows, batch by batch in order, features in the file's dtype."""
    config = plan.config
    views = fixed_views(config.aug, plan.preprocess.size, config.tta_views)
    depth = config.prefetch if config.prefetch is not None else PREFETCH[device.type]
    for model, rows in segments:
        for images, ok, errors in prefetched(decoded_batches(rows, config, device, plan.decoder), device, depth):
            features = embed(model, images, tta=config.tta, views=views).float().cpu().numpy()
            ok = ok.numpy()
            overflowed = ok & ~np.isfinite(features).all(axis=1)  # fp16/bf16 overflow: a row no head may see
            errors = [NON_FINITE if bad else e for bad, e in zip(overflowed, errors)]
            ok = ok & ~overflowed
            features[~ok] = 0.0
            yield features.astype(config.dtype), ok, errors


def _with_reused(embedded, reused: ReusableRows, contents: list[str], batch_size: int):
    """Blocks of rows in file order: the rows ``reused`` holds read from their files, the others taken in turn from
    ``embedded`` (which embeds exactly those, in order)."""
    waiting: list[tuple[np.ndarray, np.ndarray, list[str]]] = []  # embedded rows not written yet, one per row

    def take(count: int):
        while len(waiting) < count:
            features, ok, errors = next(embedded)
            waiting.extend(zip(features, ok, errors))
        taken = waiting[:count]
        del waiting[:count]
        return taken

    for begin in range(0, len(contents), batch_size):
        block = contents[begin:begin + batch_size]
        old = [k for k, content in enumerate(block) if content in reused]
        fresh = [k for k, content in enumerate(block) if content not in reused]
        rows = [None] * len(block)
        if old:
            features, ok, errors = reused.read([block[k] for k in old])
            for k, item in zip(old, zip(features, ok, errors)):
                rows[k] = item
        for k, item in zip(fresh, take(len(fresh))):
            rows[k] = item
        yield np.stack([r[0] for r in rows]), np.array([r[1] for r in rows]), [r[2] for r in rows]


def decoded_batches(rows: ImageRows, config: ExtractConfig, device: torch.device, decoder: str):
    """``(uint8 pixels, ok, errors)`` batches of ``rows`` in order, decoded by ``decoder`` (``pillow``/``tensor``)."""
    return _tensor_batches(rows, config, device) if decoder == "tensor" else _batches(rows, config, device)


def _batches(rows: ImageRows, config: ExtractConfig, device: torch.device):
    """Decoded batches in dataset order.

    On a GPU, DataLoader worker processes decode while the GPU computes (threads in a Dask worker, which may
    not start processes). On a CPU the model already uses every core, and worker processes competing with
    its threads made the whole pipeline 35 % slower than the bare forward on 2 cores; decoding each batch
    with a thread pool between forwards (Pillow releases the GIL) keeps the cores busy with one thing at a
    time.
    ``--workers N`` forces N DataLoader workers on any device.
    """
    workers = config.workers
    if workers is None and device.type == "cuda":
        workers = gpu_decoding_workers()
    if workers and multiprocessing.current_process().daemon:
        # a Dask worker process is daemonic and may not start DataLoader processes: threads decode instead
        log.debug("decoding with threads: this process may not start worker processes")
        workers = None
    if workers is not None:
        yield from torch.utils.data.DataLoader(rows, batch_size=config.batch_size, num_workers=workers,
                                               pin_memory=device.type == "cuda")
        return
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for begin in range(0, len(rows), config.batch_size):
            items = list(pool.map(rows.__getitem__, range(begin, min(begin + config.batch_size, len(rows)))))
            yield (torch.stack([i[0] for i in items]), torch.tensor([i[1] for i in items]),
                   [i[2] for i in items])


def _tensor_batches(rows: ImageRows, config: ExtractConfig, device: torch.device):
    """Batches decoded as tensors on ``device`` (``featx.embed.decoding``), the next batch's bytes read meanwhile."""
    from featx.embed.decoding import BatchDecoder

    decoder = BatchDecoder(rows.preprocess, device, threads=min(8, os.cpu_count() or 1))
    spans = [(begin, min(begin + config.batch_size, len(rows))) for begin in range(0, len(rows), config.batch_size)]

    def files(span):
        return [rows.file(i) for i in range(*span)]

    with ThreadPoolExecutor(max_workers=1) as reader, decoder:
        upcoming = reader.submit(decoder.read, files(spans[0])) if spans else None
        for k, span in enumerate(spans):
            contents = upcoming.result()
            if k + 1 < len(spans):
                upcoming = reader.submit(decoder.read, files(spans[k + 1]))
            pixels, ok, errors = decoder.decode(files(span), contents)
            for i in range(*span):  # augmented copies, seeded as on the Pillow path
                if ok[i - span[0]]:
                    pixels[i - span[0]] = rows.copied(i, pixels[i - span[0]])
            yield pixels, ok, errors


def _probe_dim(model, preprocess: Preprocess, device) -> int:
    with torch.inference_mode():
        probe = torch.zeros(1, 3, preprocess.size, preprocess.size, dtype=torch.uint8, device=device)
        return int(model(probe).shape[1])
