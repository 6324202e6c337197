"""Running a backbone once over a dataset and writing its embeddings to the HDF5 cache.

Images are decoded in DataLoader workers while the model runs; rows are written in
dataset order as batches finish, so a killed run resumes at ``rows_done`` and ends with
the same rows as an uninterrupted one. A second run with nothing changed finds the
cached file by its key and returns at once.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from featx.augment import augmentation, seeded
from featx.backbones import DEFAULT_BACKBONE
from featx.checkpoints import backbone_source
from featx.datasets import ImageDataset, Sample, scan_dataset
from featx.errors import ConfigError
from featx.feature_model import (autocast, build_feature_model, embed, optimise_for_cpu, resolve_device,
                                 resolve_precision, to_tensor)
from featx.images import MAX_PIXELS, ImageError, Preprocess, load_image
from featx.store import (AUGMENTED, CacheLock, EmbeddingWriter, cache_key, cache_path, check_intact, package_version,
                         read_meta)
from featx.vocab import check_fields, parse_layer
from featx.version import __version__

log = logging.getLogger(__name__)
NON_FINITE = "features were NaN or infinite (overflow in reduced precision?); try --precision fp32"


@dataclass(frozen=True)
class ExtractConfig:
    """How to extract; every field that changes the numbers goes into the cache key."""

    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None  # None: default search; "none": random init; else a file
    checkpoint: str | None = None  # a fine-tuned best.pt from `featx finetune`; sets backbone and preprocessing
    layer: str = "penultimate"
    tta: bool = False
    precision: str = "fp32"
    dtype: str = "float16"
    image_size: int | None = None  # None: the backbone's own input size
    max_pixels: int = MAX_PIXELS  # images larger than this are skipped (recorded), never decoded
    fit: str = "crop"  # "crop": ImageNet centre crop; "full": the whole image squeezed to the input size
    augment: int = 0  # augmented copies of each train image, stored as extra rows for the heads to train on
    aug: str = "natural"  # the copies' transforms (featx.augment)
    batch_size: int = 32
    workers: int | None = None  # DataLoader worker processes; None: 8 on GPU, a thread pool on CPU
    device: str = "auto"
    cache_dir: str = "cache"
    out: str | None = None  # an explicit file instead of the cache layout

    def __post_init__(self):
        check_fields(self, "extract")
        if self.augment and self.aug == "none":
            raise ConfigError("augmented copies need transforms: the 'aug' parameter must be natural or xray")


@dataclass
class ExtractResult:
    """What one extraction produced, for the CLI summary and for scripts."""

    path: Path
    cached: bool
    rows: int
    label: str = ""
    resumed_from: int = 0
    seconds: float = 0.0
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return (self.rows - self.resumed_from) / self.seconds if self.seconds else 0.0


class ImageRows(torch.utils.data.Dataset):
    """Decoded uint8 CHW tensors of ``files[start:]``; unreadable files give zeros and their reason.

    Rows from ``first_copy`` on are augmented copies: ``transform`` seeded by the row number, so
    a resumed extraction writes exactly the copies an uninterrupted one would.
    """

    def __init__(self, files: list[Path], preprocess: Preprocess, start: int = 0, first_copy: int | None = None,
                 transform=None):
        self.files, self.preprocess, self.start = files, preprocess, start
        self.first_copy, self.transform = first_copy if first_copy is not None else len(files), transform

    def __len__(self) -> int:
        return len(self.files) - self.start

    def __getitem__(self, i: int):
        row = self.start + i
        try:
            pixels = to_tensor(load_image(self.files[row], self.preprocess))
            if row >= self.first_copy:
                pixels = seeded(self.transform, pixels, row)
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
    progress: bool = True,
    force: bool = False,
) -> ExtractResult:
    """Embed every image of ``data`` with ``config.backbone`` into an HDF5 file, or find it cached.

    A cached file is used only once it verifies; ``force`` re-extracts it anyway (over a damaged one).
    """
    dataset = data if isinstance(data, ImageDataset) else scan_dataset(data, split=split, seed=seed,
                                                                       split_from=split_from)
    layers = parse_layer(config.layer)
    source = backbone_source(config.backbone, config.weights, config.checkpoint)
    spec = source.spec
    if source.state is None:
        preprocess = spec.preprocess_for(config.image_size, config.fit)
    elif config.image_size is None:  # a checkpoint brings the preprocessing it was trained with
        preprocess = source.preprocess
    else:
        preprocess = spec.preprocess_for(config.image_size, source.preprocess.fit)
    preprocess = replace(preprocess, max_pixels=config.max_pixels)
    transform = augmentation(config.aug, preprocess.size) if config.augment else None
    samples = dataset.samples + [Sample(s.path, s.label, AUGMENTED, s.group)
                                 for _ in range(config.augment) for s in dataset.samples if s.split == "train"]
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    recipe = {
        "dataset_fingerprint": dataset.fingerprint(), "backbone": spec.name, "weights_sha256": source.weights.sha256,
        "preprocess": preprocess.as_dict(), "layer": ",".join(layers), "pooling": "avg", "tta": config.tta,
        "dtype": config.dtype, "precision": precision,
    }
    if config.augment:  # only when asked, so keys of files made without copies stay as they were
        recipe["augment"] = {"copies": config.augment, "aug": config.aug}
    key = cache_key(recipe)
    path = Path(config.out) if config.out else cache_path(config.cache_dir, dataset.name, source.label, key)

    cached = None if force else _cached(path, key)
    if cached:
        return cached
    with CacheLock(path):
        cached = None if force else _cached(path, key)  # another process may have finished it since the first look
        if cached:
            return cached
        if force:
            path.unlink(missing_ok=True)
        model = build_feature_model(spec, source.weights, ",".join(layers), source.state).to(device)
        dim = spec.dim if layers == ("penultimate",) else _probe_dim(model, preprocess, device)
        if device.type == "cpu" and precision == "fp32":
            model = optimise_for_cpu(model, preprocess.size)
        attrs = {
            "featx_version": __version__, "backbone": spec.name, "label": source.label,
            "weights": source.weights.identifier,
            "weights_sha256": source.weights.sha256, "layer": ",".join(layers), "pooling": "avg",
            **preprocess.as_dict(), "tta": config.tta, "precision": precision, "classes": dataset.classes,
            "dataset_name": dataset.name, "dataset_root": str(dataset.root.resolve()),
            "dataset_fingerprint": dataset.fingerprint(), "fingerprint_method": dataset.fingerprint_method,
            "split_source": dataset.split_source, "scan_skipped": dataset.skipped,
            "cache_key": key, "recipe": recipe, "torch_version": package_version("torch"),
            "torchvision_version": package_version("torchvision"), "timm_version": package_version("timm"),
            "device": str(device), "config": asdict(config),
        }
        writer = EmbeddingWriter(
            path, dim=dim, paths=[s.path for s in samples], labels=[s.label for s in samples],
            splits=[s.split for s in samples], attrs=attrs, dtype=config.dtype,
        )
        rows = ImageRows([dataset.absolute_path(s) for s in samples], preprocess, writer.rows_done,
                         len(dataset.samples), transform)
        try:
            result = _run(model, dataset, rows, writer, config, device, precision, progress)
        finally:
            writer.close()
    return result


def _cached(path: Path, key: str) -> ExtractResult | None:
    if not path.exists():
        return None
    meta = read_meta(path)
    if meta.get("cache_key") != key:
        raise ConfigError(f"{path} exists but was made from other inputs (cache key {meta.get('cache_key')} "
                          f"instead of {key}); remove it or choose another --out")
    if not meta["complete"]:
        return None
    check_intact(path)  # a damaged file is never "cached": the error says to re-extract with --force
    log.info("using cached %s", path)
    return ExtractResult(path=path, cached=True, rows=int(meta["n_rows"]), label=meta.get("label") or meta["backbone"],
                         resumed_from=int(meta["n_rows"]))


def _run(model, dataset, rows: ImageRows, writer, config, device, precision, progress) -> ExtractResult:
    from tqdm.auto import tqdm

    files, start = rows.files, rows.start
    n_images = len(dataset.samples)  # later rows are augmented copies, whose failures repeat their source's
    batches = _batches(rows, config, device)
    failed: list[tuple[str, str]] = []
    began = time.perf_counter()
    bar = tqdm(total=len(files), initial=start, unit="img", desc=writer.label, disable=not progress,
               dynamic_ncols=True)
    with torch.inference_mode(), autocast(device, precision), bar:
        for images, ok, errors in batches:
            features = embed(model, images.to(device, non_blocking=True), tta=config.tta).float().cpu().numpy()
            ok = ok.numpy()
            overflowed = ok & ~np.isfinite(features).all(axis=1)  # fp16/bf16 overflow: a row no head may see
            errors = [NON_FINITE if bad else e for bad, e in zip(overflowed, errors)]
            ok = ok & ~overflowed
            features[~ok] = 0.0
            row = writer.rows_done
            failed += [(dataset.samples[row + i].path, e) for i, e in enumerate(errors) if e and row + i < n_images]
            writer.write(features.astype(config.dtype), ok, list(errors))
            bar.update(len(features))
            if failed:
                bar.set_postfix(failed=len(failed))
    seconds = time.perf_counter() - began
    if start:  # the earlier run's failures are in the file; report every row, not just this run's
        failed = [(dataset.samples[i].path, reason) for i, reason in writer.failures() if i < n_images]
    path = writer.finish({"extract_seconds": round(seconds, 3), "failed": len(failed)})
    if failed:
        log.warning("%d of %d images could not be read and were skipped (recorded in 'errors')",
                    len(failed), n_images)
    return ExtractResult(path=path, cached=False, rows=len(files), label=writer.label, resumed_from=start,
                         seconds=seconds,
                         failed=failed)


def _batches(rows: ImageRows, config: ExtractConfig, device: torch.device):
    """Decoded batches in dataset order.

    On a GPU, DataLoader worker processes decode while the GPU computes. On a CPU the model
    already uses every core, and worker processes competing with its threads made the whole
    pipeline 35 % slower than the bare forward on 2 cores; decoding each batch with a thread
    pool between forwards (Pillow releases the GIL) keeps the cores busy with one thing at a time.
    ``--workers N`` forces N DataLoader workers on any device.
    """
    workers = config.workers
    if workers is None and device.type == "cuda":
        workers = min(8, os.cpu_count() or 1)
    if workers is not None:
        yield from torch.utils.data.DataLoader(rows, batch_size=config.batch_size, num_workers=workers,
                                               pin_memory=device.type == "cuda")
        return
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for begin in range(0, len(rows), config.batch_size):
            items = list(pool.map(rows.__getitem__, range(begin, min(begin + config.batch_size, len(rows)))))
            yield (torch.stack([i[0] for i in items]), torch.tensor([i[1] for i in items]),
                   [i[2] for i in items])


def _probe_dim(model, preprocess: Preprocess, device) -> int:
    with torch.inference_mode():
        probe = torch.zeros(1, 3, preprocess.size, preprocess.size, dtype=torch.uint8, device=device)
        return int(model(probe).shape[1])
