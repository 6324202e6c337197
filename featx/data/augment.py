"""Random image transforms, shared by fine-tuning, the augmented copies of ``extract --augment`` and the
test-time views of ``extract --tta-views``.

``xray`` varies what differs between X-ray machines and sites (contrast, exposure, sharpness,
positioning) and never flips, since laterality matters; ``natural`` is the usual photo recipe.
"""

from __future__ import annotations

import hashlib
import threading
from functools import partial

import torch

from featx.vocab import check
# torchvision draws from torch's global generator; seeding it per image must not interleave across threads.
_GLOBAL_RNG = threading.Lock()
VIEW_SEED = 2**40  # test-time views draw from seeds no augmented copy (seeded by its row number) reaches


def augmentation(name: str, size: int):
    """Training-time transforms on uint8 CHW tensors, or None for ``none``."""
    from torchvision.transforms import v2

    check("augmentation", aug=name)
    if name == "none":
        return None
    if name == "xray":
        return v2.Compose([
            v2.RandomAffine(degrees=10, translate=(0.05, 0.05), scale=(0.95, 1.2)),
            v2.ColorJitter(brightness=0.2, contrast=(0.5, 1.2)),
            v2.RandomApply([v2.GaussianBlur(5, sigma=(0.3, 1.5))], p=0.5),
        ])
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=(0.6, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomRotation(10),
        v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
    ])


def copy_seed(content: str) -> int:
    """The seed of an augmented copy from what identifies it (its image's content hash and ``#k``): the same copy
    wherever its row stands, so a copy reused from an earlier file equals one made afresh."""
    return int(hashlib.sha256(content.encode("utf-8", "surrogateescape")).hexdigest()[:15], 16)


def seeded(transform, image: torch.Tensor, seed: int) -> torch.Tensor:
    """``transform(image)`` with its randomness fixed by ``seed``: the same copy on every run and on resume."""
    with _GLOBAL_RNG, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(image)


def fixed_views(name: str, size: int, count: int) -> list:
    """``count`` draws of the ``name`` transforms, each fixed by its seed and applied alike to every image (a whole
    batch at once): features averaged over them stay one function of the image, the same whether it is embedded
    in one run, in shards, in any batch, or by ``featx predict``. No views for a ``count`` of 0."""
    if not count:
        return []
    transform = augmentation(name, size)
    return [partial(seeded, transform, seed=VIEW_SEED + k) for k in range(count)]
