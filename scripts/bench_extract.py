"""Extraction speed, measured in one run on the same images and backbone.

Prints images/s of
  (a) the bare model forward on pre-decoded, pre-normalised tensors (the ceiling),
  (b) `featx extract` end to end (decode, resize, forward, HDF5 write),
  (c) a plain tutorial pipeline: torchvision ImageFolder + transforms + DataLoader, fp32 NCHW, no_grad,
and the ratios b/a and b/c, for each precision asked for.

Usage: python scripts/bench_extract.py [--images N] [--backbone NAME] [--precision fp32 --precision bf16]
Uses ../shared/data/chest_xray when present, else synthetic JPEGs written to a temporary folder.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch

from featx.backbones import get_backbone, resolve_weights
from featx.datasets import scan_dataset
from featx.extraction import ExtractConfig, extract
from featx.feature_model import autocast, build_feature_model, embed, optimise_for_cpu, resolve_precision, to_tensor
from featx.images import load_image

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "chest_xray"


def make_image_folder(target: Path, n_images: int) -> Path:
    """A class-folder copy of n real chest X-rays, or synthetic 224 px JPEGs when the shared data is absent."""
    rng = random.Random(0)
    for label in ("NORMAL", "PNEUMONIA"):
        (target / label).mkdir(parents=True)
        sources = sorted((SHARED / "train" / label).glob("*.jpeg")) if SHARED.is_dir() else []
        for i in range(n_images // 2):
            if sources:
                shutil.copy(rng.choice(sources), target / label / f"{i:05d}.jpeg")
            else:
                from PIL import Image

                pixels = np.random.default_rng(i).integers(0, 255, (224, 224, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(target / label / f"{i:05d}.jpeg", quality=90)
    return target


def time_bare(forward, batches, precision: str) -> float:
    with torch.inference_mode(), autocast(torch.device("cpu"), precision):
        forward(batches[0])  # warm-up
        began = time.perf_counter()
        for x in batches:
            forward(x)
    return sum(len(x) for x in batches) / (time.perf_counter() - began)


def time_featx(folder: Path, backbone: str, precision: str, batch_size: int) -> float:
    dataset = scan_dataset(folder, split="1,0,0")
    with tempfile.TemporaryDirectory() as cache:
        # Warm-up run on a handful of images so both sides start with loaded libraries and weights.
        extract(folder, ExtractConfig(backbone=backbone, precision=precision, cache_dir=cache + "/warm",
                                      batch_size=batch_size), split="1,0,0", progress=False)
        began = time.perf_counter()
        extract(dataset, ExtractConfig(backbone=backbone, precision=precision, cache_dir=cache,
                                       batch_size=batch_size, dtype="float32"), progress=False)
        return len(dataset) / (time.perf_counter() - began)


def time_tutorial(folder: Path, backbone: str, batch_size: int) -> float:
    """The pipeline of a typical transfer-learning tutorial, written the usual way."""
    import torchvision
    from torchvision import transforms

    spec = get_backbone(backbone)
    model = build_feature_model(spec, resolve_weights(spec)).net.to(memory_format=torch.contiguous_format)
    interpolation = transforms.InterpolationMode.BICUBIC if spec.interpolation == "bicubic" else \
        transforms.InterpolationMode.BILINEAR
    tf = transforms.Compose([
        transforms.Resize(spec.resize, interpolation=interpolation), transforms.CenterCrop(spec.input_size),
        transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std),
    ])
    loader = torch.utils.data.DataLoader(torchvision.datasets.ImageFolder(folder, tf), batch_size=batch_size,
                                         num_workers=2)
    began = time.perf_counter()
    n = 0
    with torch.no_grad():
        for x, _ in loader:
            model(x)
            n += len(x)
    return n / (time.perf_counter() - began)


@click.command()
@click.option("--images", default=384, show_default=True)
@click.option("--backbone", default="efficientnet_lite0", show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--precision", "precisions", multiple=True, default=["fp32", "bf16"], show_default=True)
def main(images, backbone, batch_size, precisions):
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
          f"backbone {backbone}, {images} images, batch {batch_size}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_image_folder(Path(tmp) / "images", images)
        spec = get_backbone(backbone)
        eager = build_feature_model(spec, resolve_weights(spec))
        decoded = [to_tensor(load_image(p, spec.preprocess)) for p in sorted(folder.rglob("*.jpeg"))]
        batches = [torch.stack(decoded[i:i + batch_size]) for i in range(0, len(decoded), batch_size)]
        tutorial = time_tutorial(folder, backbone, batch_size)
        print(f"(c) tutorial ImageFolder+DataLoader fp32 NCHW : {tutorial:7.1f} img/s")
        for precision in precisions:
            used = resolve_precision(precision, torch.device("cpu"))
            # (a) runs the very module featx runs, chunked as featx runs it, so b/a isolates decoding and writing.
            model = optimise_for_cpu(eager, spec.input_size) if used == "fp32" else eager
            eager_speed = time_bare(eager, batches, used)
            whole_batch = time_bare(model, batches, used)
            bare = time_bare(lambda x: embed(model, x), batches, used)
            pipeline = time_featx(folder, backbone, precision, batch_size)
            note = "" if used == precision else f" (ran as {used}: not native on this CPU)"
            print(f"[{precision}]{note}")
            print(f"      eager channels_last forward, for reference: {eager_speed:7.1f} img/s")
            print(f"      featx's model, {batch_size} images per forward  : {whole_batch:7.1f} img/s")
            print(f"  (a) bare model forward, pre-decoded         : {bare:7.1f} img/s")
            print(f"  (b) featx extract end to end                : {pipeline:7.1f} img/s")
            print(f"  b/a = {pipeline / bare:.2f}   b/c = {pipeline / tutorial:.2f}")

if __name__ == "__main__":
    main()
