"""kosmo.data.images: every format and mode loads as RGB, preprocessing is CLIP's, bad files give one-line errors."""

import struct
import time
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from kosmo.data.images import (CLIP_MEAN, CLIP_STD, ImageCache, decode_image_bytes, denormalize, load_image,
                               load_images, open_image, preprocess)
from kosmo.errors import KosmoError

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)
MEAN, STD = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)


def noise(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def banded(w, h, center=RED, sides=BLUE):
    """Sides-colour image with the middle third (along the long side) in the center colour."""
    img = Image.new("RGB", (w, h), sides)
    img.paste(center, (w // 3, 0, w - w // 3, h) if w >= h else (0, h // 3, w, h - h // 3))
    return img


def png(w, h, idat=zlib.compress(b"\x00\x00")):
    """PNG bytes built by hand: an 8-bit greyscale IHDR declaring w x h, whatever IDAT we give, IEND."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def rgb_at(img, xy):
    return np.asarray(img.convert("RGB"))[xy[1], xy[0]].astype(int)


def near(a, b, tol=40):
    return np.abs(np.asarray(a, int) - np.asarray(b, int)).max() <= tol


def save(img, path, **kw):
    img.save(path, **kw)
    return path


def one_line_error(fn, *args, **kw) -> str:
    with pytest.raises(KosmoError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg and e.value.__cause__ is None  # and no chained traceback from Pillow:
    assert e.value.__context__ is None or e.value.__suppress_context__
    return msg


# ---------------------------------------------------------------- formats and modes

FILES = {  # name -> (image maker, save kwargs)
    "rgb.png": (lambda: noise(50, 20), {}),
    "thin.jpg": (lambda: noise(7, 300), {"quality": 95}),
    "p.gif": (lambda: noise(33, 17).convert("P"), {}),
    "rgb.webp": (lambda: noise(50, 20), {"lossless": True}),
    "rgb.bmp": (lambda: noise(13, 9), {}),
    "rgba.png": (lambda: noise(21, 11).convert("RGBA"), {}),
    "p.png": (lambda: noise(21, 11).convert("P"), {}),
    "l.png": (lambda: noise(21, 11).convert("L"), {}),
    "la.png": (lambda: noise(21, 11).convert("LA"), {}),
    "i16.png": (lambda: Image.fromarray(np.full((11, 21), 40000, np.uint16)), {}),
    "cmyk.jpg": (lambda: noise(21, 11).convert("CMYK"), {}),
    "cmyk.tiff": (lambda: noise(21, 11).convert("CMYK"), {}),
    "one_bit.png": (lambda: noise(21, 11).convert("1"), {}),
}


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_every_format_and_mode_loads_as_rgb_and_preprocesses(tmp_path, name, mode):
    make, kw = FILES[name]
    src = make()
    path = save(src, tmp_path / name, **kw)
    img = open_image(path)
    assert img.mode == "RGB" and img.size == src.size
    t = load_image(path, 24, mode)
    assert t.shape == (3, 24, 24) and t.dtype == torch.float32 and torch.isfinite(t).all()
    assert torch.equal(preprocess(decode_image_bytes(path.read_bytes()), 24, mode), t)


def test_a_white_image_normalises_to_one_minus_mean_over_std(tmp_path):
    want = (1 - MEAN) / STD
    for mode in ("crop", "pad"):
        t = load_image(save(Image.new("RGB", (16, 16), WHITE), tmp_path / "w.png"), 16, mode)
        assert torch.allclose(t, want.expand(3, 16, 16), atol=1e-6)
        assert torch.allclose(preprocess(Image.new("RGB", (40, 40), WHITE), 16, mode), want.expand(3, 16, 16),
                              atol=1e-6)


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    grey = Image.fromarray(np.full((8, 8), 32896, np.uint16))  # 50% grey in 16 bits
    assert grey.convert("RGB").getpixel((0, 0)) == WHITE  # what Pillow alone would give
    assert near(rgb_at(open_image(save(grey, tmp_path / "g16.png")), (3, 3)), (128, 128, 128), 1)


def test_cmyk_white_stays_white(tmp_path):
    assert near(rgb_at(open_image(save(Image.new("CMYK", (8, 8), (0, 0, 0, 0)), tmp_path / "c.jpg")), (4, 4)),
                WHITE, 3)


def test_transparency_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))  # invisible red
    rgba.putpixel((5, 5), (255, 0, 0, 255))
    rgba.putpixel((6, 6), (0, 0, 0, 128))
    img = open_image(save(rgba, tmp_path / "a.png"))
    assert rgb_at(img, (0, 0)).tolist() == list(WHITE) and rgb_at(img, (5, 5)).tolist() == list(RED)
    assert near(rgb_at(img, (6, 6)), (127, 127, 127), 1)
    la = Image.new("LA", (4, 4), (0, 0))  # invisible black
    assert rgb_at(open_image(save(la, tmp_path / "la.png")), (1, 1)).tolist() == list(WHITE)
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0] * 256)
    assert rgb_at(open_image(save(pal, tmp_path / "t.gif", transparency=0)), (1, 1)).tolist() == list(WHITE)


def test_exif_orientation_is_applied(tmp_path):
    stored = Image.new("RGB", (40, 20), BLUE)
    stored.paste(RED, (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": the left edge goes to the top
    img = open_image(save(stored, tmp_path / "r.jpg", exif=exif, quality=95))
    assert img.size == (20, 40)
    assert near(rgb_at(img, (10, 5)), RED) and near(rgb_at(img, (10, 35)), BLUE)


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), BLUE)]
    path = save(frames[0], tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(path).n_frames == 2
    assert near(rgb_at(open_image(path), (4, 4)), RED, 2)


# ---------------------------------------------------------------- preprocessing

def test_crop_resizes_the_shortest_side_and_keeps_the_center():
    t = preprocess(banded(60, 20), 16)  # 60x20 -> 48x16 -> the middle 16 columns: the red band
    img = np.asarray(denormalize(t)).astype(int)
    red = (img[..., 0] > 200) & (img[..., 2] < 60)
    assert red.mean() > 0.9
    tall = np.asarray(denormalize(preprocess(banded(20, 60), 16))).astype(int)  # the same for a tall image
    assert ((tall[..., 0] > 200) & (tall[..., 2] < 60)).mean() > 0.9


def test_crop_matches_resize_then_center_crop_exactly():
    src = noise(37, 23, seed=1)
    size = 16
    ref = src.resize((16 * 37 // 23, 16), Image.Resampling.BICUBIC)
    left = round((ref.width - size) / 2)
    ref = ref.crop((left, 0, left + size, size))
    assert denormalize(preprocess(src, size)).tobytes() == ref.tobytes()


def test_a_very_thin_strip_is_cropped_without_a_huge_intermediate():
    strip = Image.new("RGB", (1, 100_000), BLUE)
    strip.paste(RED, (0, 40_000, 1, 60_000))
    start = time.perf_counter()
    t = preprocess(strip, 224)
    assert time.perf_counter() - start < 1.0
    assert t.shape == (3, 224, 224)
    assert np.asarray(denormalize(t)).reshape(-1, 3).astype(int).tolist() == [list(RED)] * 224 * 224


def test_pad_keeps_everything_and_pads_with_the_mean():
    t = preprocess(banded(60, 20), 30, "pad")  # 60x20 -> 30x10, centered vertically: rows 10..19
    assert torch.equal(t[:, :10], torch.zeros(3, 10, 30)) and torch.equal(t[:, 20:], torch.zeros(3, 10, 30))
    img = np.asarray(denormalize(t)).astype(int)
    assert near(img[15, 2], BLUE) and near(img[15, 15], RED) and near(img[15, 27], BLUE)
    assert near(img[0, 0], [round(m * 255) for m in CLIP_MEAN], 1)  # the padding is the mean colour
    tall = preprocess(banded(20, 60), 30, "pad")
    assert torch.equal(tall[:, :, :10], torch.zeros(3, 30, 10)) and torch.equal(tall[:, :, 20:], torch.zeros(3, 30, 10))
    assert near(np.asarray(denormalize(tall))[15, 15], RED) and near(np.asarray(denormalize(tall))[2, 15], BLUE)


@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_an_exact_size_image_is_not_resampled(mode):
    src = noise(32, 32, seed=2)
    t = preprocess(src, 32, mode)
    assert torch.equal(t, ((torch.from_numpy(np.array(src)).permute(2, 0, 1) / 255 - MEAN) / STD))
    assert denormalize(t).tobytes() == src.tobytes()


def test_an_image_whose_short_side_fits_is_only_cropped():
    src = noise(32, 48, seed=3)
    assert denormalize(preprocess(src, 32)).tobytes() == src.crop((0, 8, 32, 40)).tobytes()


def test_bad_preprocessing_arguments_are_kosmo_errors():
    assert "squash" in one_line_error(preprocess, noise(4, 4), 8, "squash")
    assert "size" in one_line_error(preprocess, noise(4, 4), 0)
    with pytest.raises(ValueError):
        denormalize(torch.zeros(1, 8, 8))


# ---------------------------------------------------------------- bad input

def test_a_missing_file_a_directory_and_an_oversized_file(tmp_path):
    missing = tmp_path / "nope.png"
    assert str(missing) in (msg := one_line_error(open_image, missing)) and "not found" in msg
    assert str(tmp_path) in one_line_error(open_image, tmp_path)
    big = save(noise(64, 64), tmp_path / "big.png")
    msg = one_line_error(open_image, big, max_bytes=1000)
    assert str(big) in msg and "too large" in msg
    assert "upload" in (msg := one_line_error(decode_image_bytes, big.read_bytes(), "upload", max_bytes=1000))
    assert "too large" in msg


def test_a_text_file_is_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not a picture\n")
    msg = one_line_error(open_image, path)
    assert str(path) in msg and "not an image" in msg
    assert "messages[0]" in one_line_error(decode_image_bytes, b"hello", "messages[0]")
    assert "image" in one_line_error(decode_image_bytes, b"")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP"])
def test_a_truncated_file_is_a_one_line_error(tmp_path, fmt):
    full = save(noise(64, 64, seed=4), tmp_path / f"full.{fmt.lower()}", format=fmt)
    data = full.read_bytes()
    cut = tmp_path / f"cut.{fmt.lower()}"
    cut.write_bytes(data[: len(data) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    msg = one_line_error(open_image, cut)
    assert str(cut) in msg and ("truncated" in msg or "corrupt" in msg)
    assert "upload" in one_line_error(decode_image_bytes, data[: len(data) // 2], "upload")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_the_hand_built_png_is_valid_when_honest():
    # the builder below makes bombs; check it makes a readable PNG when the header tells the truth
    img = decode_image_bytes(png(2, 1, zlib.compress(b"\x00\x10\xf0")))
    assert img.size == (2, 1) and rgb_at(img, (0, 0)).tolist() == [16] * 3 and rgb_at(img, (1, 0)).tolist() == [240] * 3


@pytest.mark.parametrize("side", [100_000, 10_000, 7_000])  # over Pillow's hard limit, over its warning, over ours
def test_a_decompression_bomb_is_refused_from_its_header(tmp_path, monkeypatch, side):
    path = tmp_path / "bomb.png"
    path.write_bytes(png(side, side))
    loads = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self) or real_load(self))
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning must not surface either
        msg = one_line_error(open_image, path)
        msg2 = one_line_error(decode_image_bytes, path.read_bytes(), "upload")
    assert time.perf_counter() - start < 1.0
    assert str(path) in msg and "too large" in msg and "before decoding" in msg
    assert msg2.startswith("upload:") and "too large" in msg2
    assert loads == []  # nothing was decoded


def test_the_pixel_cap_is_a_parameter(tmp_path):
    path = save(noise(100, 100), tmp_path / "n.png")
    assert "too large" in one_line_error(open_image, path, max_pixels=5_000)
    assert open_image(path, max_pixels=10_000).size == (100, 100)
    huge = tmp_path / "huge.png"
    huge.write_bytes(png(100_000, 100_000))  # even a caller's raised cap cannot lift Pillow's own hard limit
    assert "too large" in one_line_error(open_image, huge, max_pixels=10**12)


# ---------------------------------------------------------------- many images

def test_load_images_skips_bad_files_and_decodes_a_repeat_once(tmp_path):
    (tmp_path / "sub").mkdir()
    a = save(banded(30, 10), tmp_path / "a.png")
    b = save(noise(9, 14), tmp_path / "b.jpg")
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    paths = [a, bad, tmp_path / "sub" / ".." / "a.png", tmp_path / "gone.png", b, str(a)]
    batch = load_images(paths, 16)
    assert batch.pixels.shape == (4, 3, 16, 16) and batch.ok == [0, 2, 4, 5]
    assert torch.equal(batch.pixels[0], batch.pixels[1]) and torch.equal(batch.pixels[0], load_image(a, 16))
    assert [p for p, _ in batch.skipped] == [str(bad), str(tmp_path / "gone.png")]
    assert all(p in m and "\n" not in m for p, m in batch.skipped)
    pixels, ok, skipped = batch  # it unpacks like the plain tuple it is
    assert ok == batch.ok and len(skipped) == 2

    cache = ImageCache(16)
    cache.load(paths)
    assert cache.decoded == 4  # a, bad, gone, b: the two other spellings of a are cache hits
    cache.load(paths)
    assert cache.decoded == 4 and set(cache.skipped) == {str(bad), str(tmp_path / "gone.png")}
    for _ in range(2):  # a remembered bad file still raises, every time
        assert str(bad) in one_line_error(cache.get, bad)
    assert load_images([bad], 16).pixels.shape == (0, 3, 16, 16)


def test_the_cache_forgets_the_least_recently_used(tmp_path):
    paths = [save(noise(8, 8, seed=i), tmp_path / f"{i}.png") for i in range(3)]
    cache = ImageCache(8, max_items=2)
    cache.get(paths[0]), cache.get(paths[1]), cache.get(paths[0]), cache.get(paths[2])  # evicts 1, keeps 0
    assert cache.decoded == 3
    cache.get(paths[0])
    assert cache.decoded == 3
    cache.get(paths[1])
    assert cache.decoded == 4


def test_the_cache_checks_its_arguments_up_front():
    assert "pad" in one_line_error(ImageCache, 16, "stretch")
