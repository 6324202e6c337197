"""Decoding images as tensors, a batch at a time (``--decode tensor``).

Threads read file bytes and parse JPEG headers; the batch's JPEGs are decoded together by
``torchvision.io.decode_jpeg`` (nvJPEG on a GPU, libjpeg-turbo on a CPU), then turned upright, resized
and cropped as tensors on the same device with the geometry of the Pillow path (``featx.data.images``).
Whatever the batch decoder refuses or cannot do faithfully (PNG, CMYK or 12-bit JPEGs, a corrupt file,
an image over the pixel budget) goes through the Pillow path one image at a time and is recorded exactly
as there. Not the default: on an H100 with 16 CPU cores, Pillow in DataLoader workers fed the model
faster (docs/performance.md).
"""

from __future__ import annotations

import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from featx.embed.feature_model import to_tensor
from featx.data.images import ImageError, Preprocess, crop_geometry, load_image
from featx.data.remote import is_url, read_bytes

INTERPOLATION = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}
ORIENTATION = 0x0112  # the EXIF tag
HUFFMAN_FRAMES = (0xC0, 0xC1, 0xC2)  # baseline, extended and progressive: what nvJPEG and libjpeg both decode
OTHER_FRAMES = (0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)  # lossless, hierarchical, arithmetic


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
    """The EXIF orientation (1 when upright) of a JPEG the batch decoder reads as Pillow would: 8-bit,
    Huffman-coded, grey or three-component, within the pixel budget; None for any other file.

    Only the markers before the frame header are read, here rather than by Pillow, whose header parsing in
    Python took 45 % of the tensor path's time on an H100 (docs/performance.md)."""
    if not data.startswith(b"\xff\xd8"):
        return None
    orientation, at = 1, 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        length = int.from_bytes(data[at + 2:at + 4], "big")
        segment = data[at + 4:at + 2 + length]
        if marker in HUFFMAN_FRAMES:
            if len(segment) < 6:
                return None
            precision, height, width, components = segment[0], *struct.unpack(">HH", segment[1:5]), segment[5]
            usable = precision == 8 and components in (1, 3) and 0 < width * height <= max_pixels
            return orientation if usable else None
        if marker in OTHER_FRAMES or marker == 0xDA:  # arithmetic, lossless, or a scan before any frame
            return None
        if marker == 0xE1 and segment.startswith(b"Exif\x00\x00") and orientation == 1:
            orientation = _exif_orientation(segment[6:])
        at += 2 + length
    return None


def _exif_orientation(tiff: bytes) -> int:
    """The orientation tag of IFD0 in an EXIF block (1 when absent or unreadable), as Pillow reads it."""
    order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return 1
    ifd = struct.unpack(order + "I", tiff[4:8])[0]
    if ifd + 2 > len(tiff):
        return 1
    for entry in range(struct.unpack(order + "H", tiff[ifd:ifd + 2])[0]):
        at = ifd + 2 + 12 * entry
        if at + 12 > len(tiff):
            break
        tag, kind = struct.unpack(order + "HH", tiff[at:at + 4])
        if tag == ORIENTATION and kind == 3:  # SHORT, stored in the entry itself
            value = struct.unpack(order + "H", tiff[at + 8:at + 10])[0]
            return value if 1 <= value <= 8 else 1
    return 1


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
