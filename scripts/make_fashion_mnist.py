"""Write a seeded, stratified subset of Fashion-MNIST as image folders featx reads (train/ and test/ of class folders).

The source is Debian's `dataset-fashion-mnist` package (`apt-get install dataset-fashion-mnist`, MIT licence):
70,000 28×28 greyscale product photos in 10 classes, IDX format. Fashion-MNIST has no shift between its
train and test images, so a remedy for shift measured on it must do no harm (scripts/reproduce_chest_xray.py
--fashion).

Usage:
  python scripts/make_fashion_mnist.py OUT [--train-per-class 500] [--test-per-class 100] [--seed 0]
"""

from __future__ import annotations

import gzip
from pathlib import Path

import click
import numpy as np
from PIL import Image

SOURCE = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format): a magic number whose last byte is the number of dimensions, the sizes, then
    unsigned bytes."""
    with gzip.open(path, "rb") as stream:
        data = stream.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def stratified(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
                                   for c in range(len(CLASSES))]))


@click.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--train-per-class", default=500, show_default=True, type=click.IntRange(1, 6000))
@click.option("--test-per-class", default=100, show_default=True, type=click.IntRange(1, 1000))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0))
@click.option("--source", default=SOURCE, show_default=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The folder of the four .gz IDX files.")
def main(out, train_per_class, test_per_class, seed, source):
    """Write OUT/train/<class>/*.png and OUT/test/<class>/*.png, a stratified subset drawn with SEED."""
    rng = np.random.default_rng(seed)
    for split, prefix, per_class in (("train", "train", train_per_class), ("test", "t10k", test_per_class)):
        images = read_idx(source / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(source / f"{prefix}-labels-idx1-ubyte.gz")
        for index in stratified(labels, per_class, rng):
            folder = out / split / CLASSES[labels[index]]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[index]).save(folder / f"{prefix}-{index:05d}.png")
    print(f"wrote {out}: {10 * train_per_class} train and {10 * test_per_class} test images, seed {seed}")


if __name__ == "__main__":
    main()
