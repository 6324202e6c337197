"""Shared fixtures: small Pillow-made image folders and a tiny, fast extraction config."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
COLOURS = {"red": (200, 30, 30), "green": (30, 180, 40), "blue": (30, 40, 200)}

# Tests never reach the network: weight resolution stops at the local caches; and what featx remembers
# between commands (featx.store.memo) goes to a folder of this test session's, not the user's.
os.environ["FEATX_OFFLINE"] = "1"
os.environ["FEATX_HOME"] = tempfile.mkdtemp(prefix="featx-home-")
if "PYTEST_XDIST_WORKER" in os.environ:
    # One thread per worker (and for the processes tests start): two workers share the two cores without
    # oversubscribing them, and every feature a worker computes comes from the same kernels.
    os.environ["OMP_NUM_THREADS"] = "1"


def make_image(path: Path, colour, size=(48, 40), seed=0, fmt=None) -> Path:
    """A coloured image with a little noise, so classes are learnable and images differ."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def make_class_folders(root: Path, per_class: int = 6, splits: tuple[str, ...] = ()) -> Path:
    """``root/<class>/`` (or ``root/<split>/<class>/``) holding ``per_class`` JPEGs per class."""
    for split in splits or ("",):
        for c, (name, colour) in enumerate(COLOURS.items()):
            for i in range(per_class):
                make_image(root / split / name / f"{name}_{i:02d}.jpg", colour, seed=100 * c + i)
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_class_folders(tmp_path / "colours", per_class=6)


@pytest.fixture
def tiny_config(tmp_path):
    """resnet18 with random weights at 64 px: a real backbone, fast enough for every test."""
    from featx.embed.extraction import ExtractConfig

    return ExtractConfig(backbone="resnet18", weights="none", image_size=64, batch_size=4,
                         cache_dir=str(tmp_path / "cache"))


def needs_shared_data(*parts: str):
    return pytest.mark.skipif(not SHARED_DATA.joinpath(*parts).is_dir(),
                              reason=f"{SHARED_DATA.joinpath(*parts)} is absent")


class TinyRun(NamedTuple):
    data: Path
    embeddings: Path
    run: Path
    config: object


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> TinyRun:
    """One small dataset, its embeddings and a run folder, made once; tests that change them work on copies."""
    from featx.comparison.evaluate import compare
    from featx.embed.extraction import ExtractConfig, extract
    from featx.comparison.runs import save_run

    root = tmp_path_factory.mktemp("tiny-run")
    data = make_class_folders(root / "colours", per_class=10, splits=("train", "val", "test"))
    config = ExtractConfig(backbone="resnet18", weights="none", image_size=64, batch_size=4,
                           cache_dir=str(root / "cache"))
    embeddings = extract(data, config, progress=False).path
    save_run(compare([embeddings], ["logreg"]), root / "run")
    return TinyRun(data, embeddings, root / "run", config)


@pytest.fixture
def counted(monkeypatch):
    """How many images the backbone embeds (test-time views and flips count once per image)."""
    import featx.embed.extraction as extraction

    seen = {"images": 0}
    real = extraction.embed

    def counting(model, images, **options):
        seen["images"] += len(images)
        return real(model, images, **options)

    monkeypatch.setattr(extraction, "embed", counting)
    return seen
