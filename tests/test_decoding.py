"""The tensor pipeline (featx.embed.decoding): the same inputs as the Pillow path, and the Pillow path for what it refuses."""

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from featx.embed.decoding import BatchDecoder, batchable, orient
from featx.embed.extraction import extract
from featx.data.images import Preprocess, load_image
from featx.embed.planning import ExtractConfig, plan_extraction
from featx.store.embeddings import load_embeddings


def photo(size, seed):
    """A smooth, photo-like RGB image (noise blown up by bicubic resampling)."""
    rng = np.random.default_rng(seed)
    coarse = (rng.random((max(2, size[1] // 16), max(2, size[0] // 16), 3)) * 255).astype(np.uint8)
    return Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)


def make_photos(root):
    """JPEGs as users have them: small and full-size X-ray-like ones, portrait, grey, EXIF-rotated."""
    sizes = [(320, 240), (2000, 1700), (224, 224), (480, 640), (1024, 768), (300, 450)]
    for i, size in enumerate(sizes):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        photo(size, i).save(folder / f"{i}.jpg", quality=90)
    photo((400, 300), 10).convert("L").save(root / "a" / "grey.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown rotated by 90°
    photo((400, 300), 11).save(root / "b" / "rotated.jpg", quality=90, exif=exif.tobytes())
    return root


def cosines(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_tensor_decoding_embeds_as_the_pillow_path_does(tmp_path):
    data = make_photos(tmp_path / "photos")
    files = {}
    for decode in ("pillow", "tensor"):
        config = ExtractConfig(decode=decode, batch_size=4, cache_dir=str(tmp_path / decode))
        files[decode] = load_embeddings(extract(data, config, progress=False).path)
    assert files["tensor"].meta["decoder"] == "tensor" and files["pillow"].meta["decoder"] == "pillow"
    assert files["tensor"].ok.all() and list(files["tensor"].paths) == list(files["pillow"].paths)
    similarity = cosines(files["tensor"].features(), files["pillow"].features())
    assert similarity.min() >= 0.999, similarity


def test_what_the_batch_decoder_refuses_goes_through_pillow_exactly(tmp_path):
    photo((60, 50), 0).save(tmp_path / "plain.png")
    photo((60, 50), 1).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray((np.arange(3000).reshape(50, 60) * 20).astype(np.uint16)).save(tmp_path / "deep.png")
    photo((300, 200), 2).save(tmp_path / "whole.jpg", quality=90)
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[:len(data) // 2])
    (tmp_path / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    preprocess = Preprocess(64, 72, "bilinear")
    files = [tmp_path / n for n in ("plain.png", "cmyk.jpg", "deep.png", "whole.jpg", "truncated.jpg", "garbage.jpg",
                                    "empty.jpg")]
    assert [batchable(f.read_bytes(), preprocess.max_pixels) for f in files[:4]] == [None, None, None, 1]
    with BatchDecoder(preprocess, torch.device("cpu"), threads=2) as decoder:
        pixels, ok, errors = decoder.decode(files, decoder.read(files))
    for i, path in enumerate(files):
        try:
            expected = torch.from_numpy(load_image(path, preprocess).copy()).movedim(-1, 0)
        except Exception as err:  # the Pillow path's refusal, word for word
            assert not ok[i] and errors[i] == str(err)
        else:
            assert ok[i] and not errors[i]
            if i < 3:  # the fallbacks are Pillow's own pixels
                assert torch.equal(pixels[i], expected)
            else:
                assert (pixels[i].float() - expected.float()).abs().mean() < 1.0
    assert list(ok) == [True, True, True, True, False, False, False]


def test_the_decoder_is_part_of_the_key_only_when_it_is_the_tensor_one(tmp_path):
    data = make_photos(tmp_path / "photos")
    keys = {decode: plan_extraction(data, ExtractConfig(decode=decode, device="cpu")).key
            for decode in ("auto", "pillow", "tensor")}
    assert keys["auto"] == keys["pillow"] != keys["tensor"]  # on a CPU, auto is Pillow: the keys files always had


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_turned_upright_as_pillow_does(orientation):
    # nvJPEG ignores the tag, so the batch decoder turns images itself, on every device
    image = Image.fromarray(np.arange(5 * 3 * 3, dtype=np.uint8).reshape(5, 3, 3))
    image.getexif()[0x0112] = orientation
    upright = np.asarray(ImageOps.exif_transpose(image))
    turned = orient(torch.from_numpy(np.asarray(image).copy()).movedim(-1, 0), orientation)
    np.testing.assert_array_equal(turned.movedim(0, -1).numpy(), upright)


def test_the_header_reader_agrees_with_pillow_on_what_the_batch_decoder_may_take():
    big_endian = b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06\x00\x00"
    variants = [({}, "RGB"), ({"progressive": True}, "RGB"), ({"subsampling": 0}, "RGB"), ({}, "L"), ({}, "CMYK"),
                ({"exif": big_endian}, "RGB"), ({"comment": b"x" * 300, "icc_profile": b"\0" * 500}, "RGB")]
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        variants.append(({"exif": exif.tobytes()}, "RGB"))
    for i, (options, mode) in enumerate(variants):
        buffer = io.BytesIO()
        photo((90 + i, 70), i).convert(mode).save(buffer, "JPEG", quality=85, **options)
        data = buffer.getvalue()
        with Image.open(io.BytesIO(data)) as image:
            pillow = image.getexif().get(0x0112, 1) if image.mode in ("L", "RGB") else None
        assert batchable(data, 10**8) == pillow, (options, mode)
        assert batchable(data, (90 + i) * 70 - 1) is None  # over the pixel budget
        assert batchable(data[:20], 10**8) is None  # cut before the frame header
