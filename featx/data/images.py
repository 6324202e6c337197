"""Decoding one image safely into the RGB array a backbone expects.

Every failure a user's folder can hold (empty file, not an image, truncated file,
decompression bomb, an image over the pixel budget, NaN pixels) becomes an ``ImageError`` with
a short reason, so extraction can record it and go on. The pixel budget is checked from the
header, before anything is decoded, so one file cannot take gigabytes of memory.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from featx.data.remote import is_url, read_bytes
from featx.vocab import check

INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
MAX_PIXELS = 50_000_000  # 50 Mpx: every real photo and scan; a 16-bit one takes ~0.5 GB to decode at that size


class ImageError(Exception):
    """The file could not be turned into an image; ``str(err)`` is the reason."""


@dataclass(frozen=True)
class Preprocess:
    """How a file becomes a ``size`` × ``size`` input.

    ``fit="crop"``: shorter side to ``resize``, centre crop, as at ImageNet evaluation.
    ``fit="full"``: the whole image squeezed to ``size`` × ``size`` (Keras' ``target_size``),
    for images whose edges matter, such as chest X-rays whose lungs reach the border.
    """

    size: int
    resize: int
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    fit: str = "crop"
    max_pixels: int = MAX_PIXELS  # larger images are skipped (recorded), never decoded

    def __post_init__(self):
        check("Preprocess", fit=self.fit, max_pixels=self.max_pixels)

    @classmethod
    def from_dict(cls, recorded: dict) -> "Preprocess":
        """The preprocessing recorded in an embedding file or checkpoint sidecar."""
        return cls(recorded["image_size"], recorded["resize"], recorded["interpolation"], tuple(recorded["mean"]),
                   tuple(recorded["std"]), recorded.get("fit", "crop"), recorded.get("max_pixels", MAX_PIXELS))

    def as_dict(self) -> dict:
        recorded = {
            "image_size": self.size,
            "resize": self.resize,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
        }
        # Recorded only when not the default, so the cache keys of files made before these existed still match.
        if self.fit != "crop":
            recorded["fit"] = self.fit
        if self.max_pixels != MAX_PIXELS:
            recorded["max_pixels"] = self.max_pixels
        return recorded


def open_rgb(path: str | Path | bytes, min_side: int = 0, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode ``path`` (a file, a URL, or the bytes of an upload) to an 8-bit RGB image, upright per EXIF; images
    over ``max_pixels`` are refused unread.

    For JPEGs much larger than ``min_side`` the decoder's draft mode scales by 1/2, 1/4
    or 1/8 while decoding, which is several times faster than decoding at full size
    and resizing afterwards; the result never drops below ``min_side``.
    """
    try:
        source = (io.BytesIO(path) if isinstance(path, bytes) else _bytes_at(path) if is_url(path) else Path(path))
        if (source.getbuffer().nbytes if isinstance(source, io.BytesIO) else source.stat().st_size) == 0:
            raise ImageError("empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # Pillow's own alarm: a skip, not a note
            # A damaged EXIF block only loses the orientation; Pillow's note about it is not the user's business.
            warnings.filterwarnings("ignore", message=r"(Possibly )?[Cc]orrupt EXIF data")
            with Image.open(source) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageError(f"{width}×{height} = {width * height / 1e6:.0f} Mpx is over the pixel budget of "
                                     f"{max_pixels / 1e6:g} Mpx (--max-pixels)")
                if min_side and img.format == "JPEG" and min(img.size) >= 2 * min_side:
                    img.draft("RGB", (min_side, min_side))
                img.load()
                img = ImageOps.exif_transpose(img)
                return to_rgb(img)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image (cannot identify image file)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"decompression bomb refused ({err})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        reason = str(err) or type(err).__name__
        raise ImageError(f"cannot decode ({reason})") from None


def _bytes_at(url: str) -> io.BytesIO:
    try:
        return io.BytesIO(read_bytes(url))
    except OSError as err:  # not found, no permission, the network: the image is skipped, the run goes on
        raise ImageError(f"cannot read ({type(err).__name__}: {str(err)[:120]})") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale, palette, alpha, 16-bit and CMYK images to plain 8-bit RGB."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and 32-bit grey (medical scans): map the file's own range to 0..255.
        values = np.asarray(img, dtype=np.float32)
        bad = int((~np.isfinite(values)).sum())
        if bad:  # one NaN would make the whole scaled image NaN, i.e. black: refuse rather than guess
            raise ImageError(f"{bad} of {values.size} pixels are NaN or infinite")
        top = _bit_depth_top(values) if img.mode.startswith("I;16") else max(float(values.max()), 1.0)
        grey = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels become white, as an image viewer shows them.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _bit_depth_top(values: np.ndarray) -> float:
    """The top of a 16-bit file's own range: the smallest bit depth scanners and cameras write (8, 10, 12, 14 or 16)
    that holds its brightest pixel, so a 12-bit scan stored in 16 bits spans 0..4095, not 0..65535 where it would be
    nearly black, and scans of one depth keep their brightness relative to each other."""
    brightest = float(values.max())
    return float(next(2 ** bits - 1 for bits in (8, 10, 12, 14, 16) if brightest <= 2 ** bits - 1))


def crop_geometry(width: int, height: int, preprocess: Preprocess) -> tuple[int, int, int, int]:
    """(resized width, resized height, left, top): the shorter side to ``resize``, then the centre ``size`` crop.
    One definition for the Pillow path here and the tensor path (``featx.embed.decoding``)."""
    scale = preprocess.resize / min(width, height)
    new_w, new_h = max(preprocess.resize, int(width * scale)), max(preprocess.resize, int(height * scale))
    return new_w, new_h, int(round((new_w - preprocess.size) / 2.0)), int(round((new_h - preprocess.size) / 2.0))


def resize_and_crop(img: Image.Image, preprocess: Preprocess) -> np.ndarray:
    """Shorter side to ``resize``, centre crop to ``size`` (or the whole image to ``size``); returns HWC uint8.

    Only the source region under the crop is resampled (Pillow's ``box``): the same pixels as
    resizing the whole image and cropping, with about 13 % less work.
    """
    if preprocess.fit == "full":
        return np.asarray(img.resize((preprocess.size,) * 2, INTERPOLATIONS[preprocess.interpolation]), dtype=np.uint8)
    width, height = img.size
    new_w, new_h, left, top = crop_geometry(width, height, preprocess)
    sx, sy = new_w / width, new_h / height
    box = (left / sx, top / sy, (left + preprocess.size) / sx, (top + preprocess.size) / sy)
    img = img.resize((preprocess.size, preprocess.size), INTERPOLATIONS[preprocess.interpolation], box=box)
    return np.asarray(img, dtype=np.uint8)


def load_image(path: str | Path | bytes, preprocess: Preprocess) -> np.ndarray:
    """The model-ready HWC uint8 array for one file; raises ``ImageError`` with a reason."""
    return resize_and_crop(open_rgb(path, min_side=preprocess.resize, max_pixels=preprocess.max_pixels), preprocess)
