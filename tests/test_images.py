import numpy as np
import pytest
from PIL import Image

from featx.data.images import ImageError, Preprocess, load_image, open_rgb
from tests.conftest import make_image

PRE = Preprocess(size=32, resize=36)


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P", "CMYK", "I;16", "I", "1"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    base = Image.new("RGB", (50, 40), (120, 60, 200))
    img = base.convert(mode) if mode not in ("I;16", "I") else Image.fromarray(
        np.full((40, 50), 30000, dtype=np.uint16 if mode == "I;16" else np.int32))
    assert img.mode == mode
    path = tmp_path / f"x.{'tiff' if mode in ('CMYK', 'I;16', 'I') else 'png'}"
    img.save(path)
    out = load_image(path, PRE)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    if mode == "I;16":
        assert abs(int(out[0, 0, 0]) - round(30000 / 65535 * 255)) <= 1


def test_transparent_pixels_become_white(tmp_path):
    Image.new("RGBA", (40, 40), (0, 0, 0, 0)).save(tmp_path / "t.png")
    assert (load_image(tmp_path / "t.png", PRE) == 255).all()


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (60, 30), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 30, 30))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    img.save(tmp_path / "r.jpg", exif=exif, quality=95)
    upright = open_rgb(tmp_path / "r.jpg")
    assert upright.size == (30, 60)
    pixels = np.asarray(upright)
    assert pixels[:25].mean() > 200 and pixels[35:].mean() < 50  # white half now on top


def test_large_jpeg_is_decoded_in_draft_mode_but_not_below_the_resize(tmp_path):
    make_image(tmp_path / "big.jpg", (100, 100, 100), size=(2000, 1600))
    img = open_rgb(tmp_path / "big.jpg", min_side=256)
    assert 256 <= min(img.size) < 800
    assert load_image(tmp_path / "big.jpg", Preprocess(224, 256)).shape == (224, 224, 3)


def test_resize_then_centre_crop(tmp_path):
    pixels = np.zeros((40, 80, 3), dtype=np.uint8)
    pixels[:, 30:50] = 255  # a white band in the middle survives the centre crop
    Image.fromarray(pixels).save(tmp_path / "band.png")
    out = load_image(tmp_path / "band.png", Preprocess(size=20, resize=20))
    assert out.shape == (20, 20, 3)
    assert out[:, 8:12].mean() > 200 and out[:, :3].mean() < 30


def test_full_fit_squeezes_the_whole_image_in(tmp_path):
    pixels = np.zeros((40, 80, 3), dtype=np.uint8)
    pixels[:, :10] = 255  # a white edge that a centre crop cuts off
    Image.fromarray(pixels).save(tmp_path / "edge.png")
    assert load_image(tmp_path / "edge.png", Preprocess(size=20, resize=20))[:, :2].mean() < 30
    full = Preprocess(size=20, resize=20, fit="full")
    out = load_image(tmp_path / "edge.png", full)
    assert out.shape == (20, 20, 3) and out[:, :2].mean() > 200 and out[:, 5:].mean() < 30
    assert Preprocess.from_dict(full.as_dict()) == full
    assert "fit" not in Preprocess(20, 20).as_dict()  # files made before ``fit`` keep their cache keys


def test_bad_files_raise_image_error_with_a_reason(tmp_path, monkeypatch):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello, not an image")
    good = make_image(tmp_path / "good.jpg", (10, 200, 10), size=(200, 200)).read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(good[: len(good) // 2])
    expected = {"empty.jpg": "empty file", "text.jpg": "not an image", "truncated.jpg": "truncated"}
    for name, reason in expected.items():
        with pytest.raises(ImageError, match=reason):
            load_image(tmp_path / name, PRE)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(tmp_path / "good.jpg", PRE)
