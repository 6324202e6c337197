"""Decoding images as tensors, a batch at a time (``--decode tensor``).

Threads read file bytes and parse JPEG headers; the batch's JPEGs are decoded together by
``torchvision.io.decode_jpeg`` (nvJPEG on a GPU, libjpeg-turbo on a CPU), then turned upright, resized
and cropped as tensors on the same device with the geometry of the Pillow path (``featx.images``).
Whatever the batch decoder refuses or cannot do faithfully (PNG, CMYK or 12-bit JPEGs, a corrupt file,
an image over the pixel budget) goes through the Pillow path one image at a time and is recorded exactly
as there. Not the default: on an H100 with 16 CPU cores, Pillow in DataLoader workers fed the model
faster (README, Performance).
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
ORIENTATION = 0x0112  # the EXIF tag


def resize_and_crop(image: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """A uint8 CHW image (or NCHW images of one size) to ``size`` × ``size``, on its own device, antialiased as
    Pillow resamples."""
    if preprocess.fit == "full":
        new_w, new_h, left, top = preprocess.size, preprocess.size, 0, 0
    else:
        new_w, new_h, left, top = crop_geometry(image.shape[-1], image.shape[-2], preprocess)
    image = F.resize(image, [new_h, new_w], interpolation=INTERPOLATION[preprocess.interpolation], antialias=True)
    return image[..., top:top + preprocess.size, left:left + preprocess.size]


def _read(path: Path | str) -> bytes:
    return read_bytes(path) if is_url(path) else Path(path).read_bytes()


def batchable(data: bytes, max_pixels: int) -> int | None:
    """The EXIF orientation (1 when upright) of a JPEG the batch decoder reads as Pillow would: 8-bit RGB or
    grey, within the pixel budget; None for any other file. Only the header is parsed."""
    if not data.startswith(b"\xff\xd8"):
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if img.format != "JPEG" or img.mode not in BATCH_MODES or width * height > max_pixels:
                return None
            return int(img.getexif().get(ORIENTATION, 1))
    except Exception:  # anything unreadable is for the Pillow path to name
        return None


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """A CHW image turned upright as its EXIF orientation says, as Pillow's ``exif_transpose`` does. nvJPEG
    ignores the tag (torchvision applies it only on a CPU), so the batch decoder applies it itself."""
    if orientation in (5, 7):  # transposed, then as 1 and 3
        image, orientation = image.transpose(-2, -1), orientation - 4
    turns = {3: 2, 6: -1, 8: 1}.get(orientation)
    if turns:
        return torch.rot90(image, turns, dims=(-2, -1))
    if orientation in (2, 4):
        return image.flip(-1 if orientation == 2 else -2)
    return image


class BatchDecoder:
    """Files to a ``(pixels, ok, errors)`` batch on ``device``, as ``extraction.ImageRows`` gives them one by one."""

    def __init__(self, preprocess: Preprocess, device: torch.device, threads: int = 8):
        self.preprocess, self.device = preprocess, device
        self.pool = ThreadPoolExecutor(max_workers=threads)

    def __enter__(self) -> "BatchDecoder":
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown()

    def read(self, files: list) -> list[tuple[bytes | None, int | None]]:
        """Each file's bytes and, for a JPEG the batch decoder takes, its EXIF orientation (``batchable``), read
        and parsed in threads; (None, None) for a file that cannot be read (the Pillow path then says why)."""
        def read_one(path):
            try:
                data = _read(path)
            except OSError:
                return None, None
            return data, batchable(data, self.preprocess.max_pixels)
        return list(self.pool.map(read_one, files))

    def decode(self, files: list, contents: list) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """``contents`` as ``read`` gives them. The decoded JPEGs are resized a group of equal sizes at a time:
        one image at a time, resizing cost three times what nvJPEG's decoding does."""
        size = self.preprocess.size
        pixels = torch.zeros(len(files), 3, size, size, dtype=torch.uint8, device=self.device)
        ok, errors = [True] * len(files), [""] * len(files)
        jpegs = [i for i, (_, orientation) in enumerate(contents) if orientation]
        decoded = self._decode_jpegs([contents[i][0] for i in jpegs])
        same_size: dict[tuple, list] = {}
        for i, image in zip(jpegs, decoded):
            if image is not None:
                image = orient(image, contents[i][1])
                same_size.setdefault(tuple(image.shape), []).append((i, image))
        for group in same_size.values():
            rows = [i for i, _ in group]
            pixels[rows] = resize_and_crop(torch.stack([image for _, image in group]), self.preprocess)
        done = {i for group in same_size.values() for i, _ in group}
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
            return decode_jpeg(buffers, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            return [self._decode_one(b) for b in buffers]

    def _decode_one(self, buffer: torch.Tensor) -> torch.Tensor | None:
        try:
            return decode_jpeg(buffer, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            return None

    def _pillow(self, path) -> torch.Tensor | ImageError:
        try:
            return to_tensor(load_image(path, self.preprocess))
        except ImageError as err:
            return err
