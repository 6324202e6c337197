"""Decoding images as tensors, a batch at a time: what keeps a GPU fed.

Pillow decodes one image per CPU core at a time, a few dozen full-size JPEGs per second, while one GPU
embeds thousands. Here threads only read file bytes; the batch's JPEGs are decoded together by
``torchvision.io.decode_jpeg`` (nvJPEG on a GPU, libjpeg-turbo on a CPU), then resized and cropped as
tensors on the same device with the geometry of the Pillow path (``featx.images``). Whatever the batch
decoder refuses or cannot do faithfully (PNG, CMYK or 12-bit JPEGs, a corrupt file, an image over the
pixel budget) goes through the Pillow path one image at a time and is recorded exactly as there.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from featx.feature_model import to_tensor
from featx.images import ImageError, Preprocess, crop_geometry, load_image
from featx.remote import is_url, read_bytes

INTERPOLATION = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}
BATCH_MODES = ("RGB", "L")  # JPEG colour modes the batch decoder turns into RGB as Pillow does


def resize_and_crop(image: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """A uint8 CHW image to ``size`` × ``size``, on its own device, antialiased as Pillow resamples."""
    if preprocess.fit == "full":
        new_w, new_h, left, top = preprocess.size, preprocess.size, 0, 0
    else:
        new_w, new_h, left, top = crop_geometry(image.shape[-1], image.shape[-2], preprocess)
    image = F.resize(image, [new_h, new_w], interpolation=INTERPOLATION[preprocess.interpolation], antialias=True)
    return image[..., top:top + preprocess.size, left:left + preprocess.size]


def _read(path: Path | str) -> bytes:
    return read_bytes(path) if is_url(path) else Path(path).read_bytes()


def batchable(data: bytes, max_pixels: int) -> bool:
    """True for a JPEG the batch decoder reads as Pillow would: 8-bit RGB or grey, within the pixel budget.
    Only the header is parsed."""
    if not data.startswith(b"\xff\xd8"):
        return False
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            return img.format == "JPEG" and img.mode in BATCH_MODES and width * height <= max_pixels
    except Exception:  # anything unreadable is for the Pillow path to name
        return False


class BatchDecoder:
    """Files to a ``(pixels, ok, errors)`` batch on ``device``, as ``extraction.ImageRows`` gives them one by one."""

    def __init__(self, preprocess: Preprocess, device: torch.device, threads: int = 8):
        self.preprocess, self.device = preprocess, device
        self.pool = ThreadPoolExecutor(max_workers=threads)

    def __enter__(self) -> "BatchDecoder":
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown()

    def read(self, files: list) -> list[bytes | None]:
        """The files' bytes, read in threads; None for one that cannot be read (the Pillow path then says why)."""
        def read_one(path):
            try:
                return _read(path)
            except OSError:
                return None
        return list(self.pool.map(read_one, files))

    def decode(self, files: list, contents: list) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        size = self.preprocess.size
        pixels = torch.zeros(len(files), 3, size, size, dtype=torch.uint8, device=self.device)
        ok, errors = [True] * len(files), [""] * len(files)
        jpegs = [i for i, data in enumerate(contents)
                 if isinstance(data, bytes) and batchable(data, self.preprocess.max_pixels)]
        done = set()
        for i, image in zip(jpegs, self._decode_jpegs([contents[i] for i in jpegs])):
            if image is not None:
                pixels[i] = resize_and_crop(image, self.preprocess)
                done.add(i)
        fallback = [i for i in range(len(files)) if i not in done]
        for i, outcome in zip(fallback, self.pool.map(self._pillow, [files[i] for i in fallback])):
            if isinstance(outcome, ImageError):
                ok[i], errors[i] = False, str(outcome)
            else:
                pixels[i] = outcome.to(self.device, non_blocking=True)
        return pixels, torch.tensor(ok), errors

    def _decode_jpegs(self, data: list[bytes]) -> list[torch.Tensor | None]:
        """All together; if the batch fails, one by one, so that one bad file costs only itself."""
        buffers = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
        if not buffers:
            return []
        try:
            return decode_jpeg(buffers, mode=ImageReadMode.RGB, device=self.device, apply_exif_orientation=True)
        except RuntimeError:
            return [self._decode_one(b) for b in buffers]

    def _decode_one(self, buffer: torch.Tensor) -> torch.Tensor | None:
        try:
            return decode_jpeg(buffer, mode=ImageReadMode.RGB, device=self.device, apply_exif_orientation=True)
        except RuntimeError:
            return None

    def _pillow(self, path) -> torch.Tensor | ImageError:
        try:
            return to_tensor(load_image(path, self.preprocess))
        except ImageError as err:
            return err
