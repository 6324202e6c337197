"""Extraction speed, measured in one run on the same images, per backbone and precision.

Prints images/s of
  (a) the bare model forward on pre-decoded tensors already on the device (the ceiling),
  (b) `featx extract` end to end (read, decode, resize, forward, HDF5 write), once per decoder:
      pillow (one image per CPU thread) and tensor (JPEG batches decoded on the device, featx.embed.decoding),
  (c) a plain tutorial pipeline: torchvision ImageFolder + transforms + DataLoader, fp32 NCHW, no_grad,
and the ratios b/a and b/c; (d) decoding alone, each decoder, no model: the ceiling that decoding puts on (b);
and with --tta-views K, (e) `featx extract --tta-views K --aug xray` with the first decoder, and e/b against the
1/(K+1) that the extra forwards alone would give (the rest is the views' transforms).

Usage: python scripts/bench_extract.py [--device cpu|cuda] [--images N] [--image-px 2000]
                                       [--backbone efficientnet_lite0 --backbone resnet50] [--precision fp32 ...]
                                       [--tta-views 4]
Images: ../shared/data/chest_xray when present (downsized copies), else generated JPEGs; --image-px N generates
N-pixel-wide photo-like JPEGs (users' X-rays are about 2000 × 1700). A backbone without installed weights
runs with random weights (the speed is the same).
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import click
import numpy as np
import torch

from featx.embed.backbones import RANDOM_INIT, get_backbone, resolve_weights
from featx.errors import WeightsError
from featx.embed.extraction import ImageRows, decoded_batches, extract
from featx.embed.feature_model import autocast, build_feature_model, embed, optimise_for_cpu, to_tensor
from featx.embed.hardware import cpu_model, resolve_precision
from featx.data.images import load_image
from featx.embed.planning import ExtractConfig

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "chest_xray"


def make_image_folder(target: Path, n_images: int, image_px: int) -> Path:
    """A class-folder copy of n real chest X-rays, or generated photo-like JPEGs (224 px, or ``image_px`` wide)."""
    from PIL import Image

    rng = random.Random(0)
    for label in ("NORMAL", "PNEUMONIA"):
        (target / label).mkdir(parents=True)
        sources = sorted((SHARED / "train" / label).glob("*.jpeg")) if SHARED.is_dir() and not image_px else []
        for i in range(n_images // 2):
            if sources:
                shutil.copy(rng.choice(sources), target / label / f"{i:05d}.jpeg")
                continue
            width = image_px or 224
            height = width * 17 // 20 if image_px else 224
            coarse = np.random.default_rng(i).integers(0, 255, (height // 16, width // 16, 3), dtype=np.uint8)
            image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
            image.save(target / label / f"{i:05d}.jpeg", quality=90)
    return target


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_bare(forward, batches, device, precision: str) -> float:
    with torch.inference_mode(), autocast(device, precision):
        forward(batches[0])  # warm-up
        synchronize(device)
        began = time.perf_counter()
        for x in batches:
            forward(x)
        synchronize(device)
    return sum(len(x) for x in batches) / (time.perf_counter() - began)


def time_featx(folder: Path, config: ExtractConfig) -> float:
    with tempfile.TemporaryDirectory() as cache:
        # A warm-up run first, so that every side starts with loaded libraries and weights.
        extract(folder, replace(config, cache_dir=cache + "/warm"), split="1,0,0", progress=False)
        n_images = sum(1 for _ in folder.rglob("*.jpeg"))
        began = time.perf_counter()
        extract(folder, replace(config, cache_dir=cache, dtype="float32"), split="1,0,0", progress=False)
        return n_images / (time.perf_counter() - began)


def time_decoding(files: list[Path], spec, config: ExtractConfig, device) -> float:
    """Images/s of featx's decoding alone, as ``featx extract`` feeds its model (batches on the device)."""
    rows = ImageRows(files, spec.preprocess, range(len(files)), len(files))
    began = time.perf_counter()
    for pixels, _, _ in decoded_batches(rows, config, device, config.decode):
        pixels.to(device, non_blocking=True)
    synchronize(device)
    return len(files) / (time.perf_counter() - began)


def time_tutorial(folder: Path, model, spec, device, batch_size: int) -> float:
    """The pipeline of a typical transfer-learning tutorial, written the usual way."""
    import torchvision
    from torchvision import transforms

    interpolation = transforms.InterpolationMode.BICUBIC if spec.interpolation == "bicubic" else \
        transforms.InterpolationMode.BILINEAR
    tf = transforms.Compose([
        transforms.Resize(spec.resize, interpolation=interpolation), transforms.CenterCrop(spec.input_size),
        transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std),
    ])
    loader = torch.utils.data.DataLoader(torchvision.datasets.ImageFolder(folder, tf), batch_size=batch_size,
                                         num_workers=min(8, os.cpu_count() or 1))
    net = model.net.to(device, memory_format=torch.contiguous_format)
    began, n = time.perf_counter(), 0
    with torch.no_grad():
        for x, _ in loader:
            net(x.to(device))
            n += len(x)
    synchronize(device)
    return n / (time.perf_counter() - began)


def weights_for(spec):
    """(weights, the --weights value): the installed weights, or random ones where none are installed."""
    try:
        return resolve_weights(spec), None
    except WeightsError:
        return RANDOM_INIT, "none"


@click.command()
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]))
@click.option("--images", default=384, show_default=True)
@click.option("--image-px", default=0, show_default=True, help="Generate JPEGs this wide (0: chest X-rays or 224 px).")
@click.option("--backbone", "backbones", multiple=True, default=["efficientnet_lite0", "resnet50"], show_default=True)
@click.option("--batch-size", default=None, type=int, help="Default: 32 on CPU, 256 on GPU.")
@click.option("--precision", "precisions", multiple=True, default=["fp32", "bf16"], show_default=True)
@click.option("--decode", "decoders", multiple=True, default=["pillow", "tensor"], show_default=True)
@click.option("--workers", type=int, default=None, help="DataLoader workers of the Pillow path (default: featx's).")
@click.option("--tta-views", default=0, show_default=True, help="Also time featx extract with this many test-time views.")
@click.option("--prefetch", "prefetches", multiple=True, type=int,
              help="Time (b) with this many batches decoded ahead (repeatable; default: featx's own choice).")
def main(device, images, image_px, backbones, batch_size, precisions, decoders, workers, tta_views, prefetches):
    torch.manual_seed(0)
    device = torch.device(device)
    batch_size = batch_size or (256 if device.type == "cuda" else 32)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    print(f"{where}; torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores; "
          f"{images} images{f' of {image_px} px' if image_px else ''}, batch {batch_size}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_image_folder(Path(tmp) / "images", images, image_px)
        files = sorted(folder.rglob("*.jpeg"))
        for backbone in backbones:
            spec = get_backbone(backbone)
            weights, weights_arg = weights_for(spec)
            eager = build_feature_model(spec, weights).to(device)
            decoded = [to_tensor(load_image(p, spec.preprocess)) for p in files]
            batches = [torch.stack(decoded[i:i + batch_size]).to(device) for i in range(0, len(decoded), batch_size)]
            tutorial = time_tutorial(folder, eager, spec, device, batch_size)
            print(f"\n{backbone}{' (random weights: none installed)' if weights_arg else ''}")
            print(f"  (c) tutorial ImageFolder+DataLoader fp32 NCHW : {tutorial:8.1f} img/s")
            for decode in decoders:
                alone = time_decoding(files, spec, ExtractConfig(decode=decode, batch_size=batch_size, workers=workers),
                                      device)
                print(f"  (d) featx decoding alone, {decode:6s}         : {alone:8.1f} img/s")
            for precision in precisions:
                used, reason = resolve_precision(precision, device.type, spec.architecture)
                model = optimise_for_cpu(eager, spec.input_size, used) if device.type == "cpu" else eager
                bare = time_bare(lambda x: embed(model, x), batches, device, used)
                print(f"  [{precision}]" + ("" if used == precision else f" ran as {used}: {reason}"))
                print(f"  (a) bare model forward, pre-decoded on {device.type:4s} : {bare:8.1f} img/s")
                end_to_end = {}
                for decode in decoders:
                    for depth in prefetches or (None,):
                        config = ExtractConfig(backbone=backbone, weights=weights_arg, precision=precision,
                                               decode=decode, device=device.type, batch_size=batch_size,
                                               workers=workers, prefetch=depth)
                        end_to_end[decode] = time_featx(folder, config)
                        ahead = "" if depth is None else f", {depth} ahead"
                        print(f"  (b) featx extract, {decode:6s} decoding{ahead:9s}: {end_to_end[decode]:8.1f} img/s   "
                              f"b/a = {end_to_end[decode] / bare:.2f}   b/c = {end_to_end[decode] / tutorial:.2f}")
                if tta_views:
                    config = replace(config, decode=decoders[0], tta_views=tta_views, aug="xray")
                    with_views = time_featx(folder, config)
                    print(f"  (e) featx extract, {tta_views} test-time views     : {with_views:8.1f} img/s   "
                          f"e/b = {with_views / end_to_end[decoders[0]]:.2f}   1/(K+1) = {1 / (tta_views + 1):.2f}")


if __name__ == "__main__":
    main()
