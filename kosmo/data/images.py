"""Opening images safely and turning them into CLIP-normalised tensors.

- `open_image(path, max_pixels, max_bytes)`: an RGB PIL image. A missing, oversized, unreadable, truncated or
  decompression-bomb file becomes a one-line `KosmoError` that names it; a bomb is refused from its header,
  before any pixel is decoded. Alpha is composited on white, EXIF orientation applied, animations give frame 0.
- `decode_image_bytes(data, source, ...)`: the same for bytes in memory (base64 images sent to the server).
- `preprocess(img, size, mode)`: float32 (3, size, size). "crop" is CLIP's: shortest side to `size` (bicubic),
  center crop. "pad" is LLaVA's: longest side to `size`, padded to a square with the mean colour (exactly 0
  after normalisation). An image already `size` x `size` is never resampled.
- `load_image(path, size, mode, **caps)`: open + preprocess. `denormalize(t)`: a tensor back to a picture.
- `EncodedImage(data, source)`: an image held as encoded bytes (a parquet column), usable wherever a path is.
- `ImageCache(size, mode, ...)`: for data streams. `.get(path)` decodes each file once (bad files too: their
  error is remembered in `.skipped`); `.load(paths)` returns `ImageBatch(pixels (N,3,S,S), ok, skipped)`,
  leaving bad files out instead of failing. `load_images(paths, size, mode, **caps)` is its one-shot form.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from kosmo.errors import KosmoError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_PIXELS = 40_000_000  # a 40-megapixel photo still loads; a 100k x 100k "bomb" does not
MAX_BYTES = 50 * 2**20
MODES = ("crop", "pad")

_MEAN = torch.tensor(CLIP_MEAN).view(3, 1, 1)
_STD = torch.tensor(CLIP_STD).view(3, 1, 1)
_BICUBIC = Image.Resampling.BICUBIC


def open_image(path: str | Path, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_BYTES) -> Image.Image:
    """The image at `path` as RGB, or a KosmoError naming the file."""
    try:
        nbytes = os.stat(path).st_size  # refuse a huge file before reading any of it
        if not Path(path).is_file():
            raise KosmoError(f"{path}: not an image file (it is a directory or a device)")
        _check_bytes(nbytes, str(path), max_bytes)
        with open(path, "rb") as f:
            return _decode(f, str(path), max_pixels)
    except FileNotFoundError:
        raise KosmoError(f"{path}: image file not found") from None
    except OSError as e:  # permissions, I/O errors: everything Pillow raises is handled in _decode
        raise KosmoError(f"{path}: cannot read image file ({e.strerror or _one_line(e)})") from None


def decode_image_bytes(data: bytes, source: str = "image", max_pixels: int = MAX_PIXELS,
                       max_bytes: int = MAX_BYTES) -> Image.Image:
    """Encoded image bytes (PNG, JPEG, ...) as RGB, or a KosmoError naming `source`."""
    _check_bytes(len(data), source, max_bytes)
    return _decode(io.BytesIO(data), source, max_pixels)


@dataclass(frozen=True)
class EncodedImage:
    """An image's encoded bytes (PNG, JPEG, ...) with where they came from, for data that stores images inline
    (a Hugging Face `datasets` Image column). Hashable, so it keys an image bank as a path does."""

    data: bytes
    source: str

    def __str__(self) -> str:
        return self.source


def preprocess(img: Image.Image, size: int, mode: str = "crop") -> torch.Tensor:
    """A CLIP-normalised float32 (3, size, size) tensor of `img` ("crop": CLIP, "pad": LLaVA)."""
    if mode not in MODES:
        raise KosmoError(f"image preprocessing mode must be one of {', '.join(MODES)}, got {mode!r}")
    if size < 1:
        raise KosmoError(f"image size must be positive, got {size}")
    img = img if img.mode == "RGB" else _to_rgb(img)
    w, h = img.size
    if mode == "pad":
        nw, nh = max(1, round(w * size / max(w, h))), max(1, round(h * size / max(w, h)))
        img = img if (nw, nh) == (w, h) else img.resize((nw, nh), _BICUBIC)
        out = torch.zeros(3, size, size)  # 0 is the mean colour once normalised
        top, left = (size - nh) // 2, (size - nw) // 2
        out[:, top:top + nh, left:left + nw] = _normalize(img)
        return out
    # CLIP: the long side becomes int(size * long / short) as in torchvision, then a centered crop.
    nw, nh = (size, size * h // w) if w <= h else (size * w // h, size)
    left, top = round((nw - size) / 2), round((nh - size) / 2)
    if (nw, nh) != (w, h) and nw * nh <= 16 * size * size:
        img = img.resize((nw, nh), _BICUBIC)
    elif (nw, nh) != (w, h):
        # A thin strip (1 x 100000 would resize to 224 x 22,400,000): resample only the crop's box of the source.
        # Pillow's filter still reads beyond the box, so this differs from the above by rounding only (mostly
        # 1/255; the two paths order their 8-bit passes differently on some shapes).
        sx, sy = w / nw, h / nh
        box = (left * sx, top * sy, min(w, (left + size) * sx), min(h, (top + size) * sy))
        return _normalize(img.resize((size, size), _BICUBIC, box=box))
    return _normalize(img.crop((left, top, left + size, top + size)))  # an exact fit is never resampled


def load_image(path: str | Path | EncodedImage, size: int, mode: str = "crop", max_pixels: int = MAX_PIXELS,
               max_bytes: int = MAX_BYTES) -> torch.Tensor:
    if isinstance(path, EncodedImage):
        return preprocess(decode_image_bytes(path.data, path.source, max_pixels, max_bytes), size, mode)
    return preprocess(open_image(path, max_pixels, max_bytes), size, mode)


def denormalize(t: torch.Tensor) -> Image.Image:
    """A (3, H, W) (or (1, 3, H, W)) normalised tensor back to an RGB picture."""
    if t.dim() == 4 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 3 or t.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) image tensor, got shape {tuple(t.shape)}")
    x = (t.detach().float().cpu() * _STD + _MEAN).clamp(0, 1).mul(255).round().to(torch.uint8)
    return Image.fromarray(x.permute(1, 2, 0).contiguous().numpy())


class ImageBatch(NamedTuple):
    pixels: torch.Tensor  # (N, 3, S, S): the images that loaded, in input order
    ok: list[int]  # the index in `paths` of each row of `pixels`
    skipped: list[tuple[str, str]]  # (path, one-line error) for each bad entry of `paths`


class ImageCache:
    """Preprocessed images by file, each decoded once; keeps at most `max_items` (least recently used go first).

    A bad file is remembered as well (in `skipped`: path -> message), so a stream that meets it again and again
    pays for it once. Returned tensors are shared between callers: do not modify them in place.
    """

    def __init__(self, size: int, mode: str = "crop", max_items: int | None = None, max_pixels: int = MAX_PIXELS,
                 max_bytes: int = MAX_BYTES):
        preprocess(Image.new("RGB", (1, 1)), size, mode)  # bad size/mode fail here, not at the first image
        self.size, self.mode, self.max_items = size, mode, max_items
        self._caps = (max_pixels, max_bytes)
        self._items: OrderedDict[str, torch.Tensor | str] = OrderedDict()  # a str is the error message
        self.skipped: dict[str, str] = {}
        self.decoded = 0  # files actually opened, for statistics (and tests)

    def get(self, path: str | Path | EncodedImage) -> torch.Tensor:
        """The preprocessed image at `path`, or the KosmoError it gives."""
        # one file under two spellings is one entry
        key = path if isinstance(path, EncodedImage) else os.path.realpath(path)
        item = self._items.get(key)
        if item is None:
            self.decoded += 1
            try:
                item = load_image(path, self.size, self.mode, *self._caps)
            except KosmoError as e:
                item = self.skipped[str(path)] = str(e)
            self._items[key] = item
            if self.max_items and len(self._items) > self.max_items:
                self._items.popitem(last=False)
        else:
            self._items.move_to_end(key)
        if isinstance(item, str):
            raise KosmoError(item)  # a fresh exception each time, so tracebacks do not pile up on one
        return item

    def load(self, paths: Iterable[str | Path | EncodedImage]) -> ImageBatch:
        """Every image of `paths` that loads, stacked; the others are listed in `skipped`, not raised."""
        rows, ok, skipped = [], [], []
        for i, path in enumerate(paths):
            try:
                rows.append(self.get(path))
                ok.append(i)
            except KosmoError as e:
                skipped.append((str(path), str(e)))
        pixels = torch.stack(rows) if rows else torch.empty(0, 3, self.size, self.size)
        return ImageBatch(pixels, ok, skipped)


def load_images(paths: Iterable[str | Path], size: int, mode: str = "crop", max_pixels: int = MAX_PIXELS,
                max_bytes: int = MAX_BYTES) -> ImageBatch:
    """Loads many images at once, decoding a repeated path once and skipping (and reporting) bad files."""
    return ImageCache(size, mode, None, max_pixels, max_bytes).load(paths)


def _check_bytes(nbytes: int, source: str, max_bytes: int) -> None:
    if nbytes > max_bytes:
        raise KosmoError(f"{source}: image file too large ({nbytes:,} bytes, limit {max_bytes:,})")


def _decode(fp: BinaryIO, source: str, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Our own cap decides below; Pillow's warning at its own limit would only be noise on stderr.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(fp)  # lazy: reads the header only
    except UnidentifiedImageError:
        raise KosmoError(f"{source}: not an image Pillow can read") from None
    except Image.DecompressionBombError as e:  # over Pillow's own hard limit: refused from the header too
        m = re.search(r"\((\d+) pixels\)", str(e))
        raise _too_large(source, f"{int(m.group(1)):,} pixels" if m else "over Pillow's limit", max_pixels) from None
    except Exception as e:  # a header some plugin chokes on (SyntaxError, ValueError, struct.error, ...)
        raise KosmoError(f"{source}: corrupt or truncated image header ({_one_line(e)})") from None
    with im:
        w, h = im.size
        if w * h > max_pixels:
            raise _too_large(source, f"{w}x{h}", max_pixels)
        if w * h == 0:
            raise KosmoError(f"{source}: empty image ({w}x{h})")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im.load()  # the first frame of an animation
                out = _to_rgb(_upright(im))
        except Image.DecompressionBombError:  # a later GIF frame or an ICO entry bigger than the header said
            raise _too_large(source, "a frame over Pillow's limit", max_pixels, decoded=True) from None
        except Exception as e:  # truncated or corrupt data: OSError, SyntaxError, zlib/struct errors, ...
            raise KosmoError(f"{source}: corrupt or truncated image ({_one_line(e)})") from None
    if out.width * out.height > max_pixels:
        raise _too_large(source, f"{out.width}x{out.height}", max_pixels, decoded=True)
    return out


def _upright(im: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # broken EXIF should not cost a good picture: keep it as stored
        return im


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode.startswith("I") or im.mode == "F":
        # Pillow's own conversion clips 16-bit values at 255 (almost all white); scale them to 8 bits instead.
        a = np.asarray(im).astype(np.float32)
        peak = float(a.max()) if a.size else 0.0
        if im.mode.startswith("I;16") or peak > 255:
            scale = 255 / 65535  # 16-bit samples
        elif im.mode == "F" and peak <= 1:
            scale = 255.0  # floats in [0, 1]
        else:
            scale = 1.0  # 32-bit ints or floats that already hold 0..255
        im = Image.fromarray(np.clip(np.rint(a * scale), 0, 255).astype(np.uint8))
    if "A" in im.getbands() or "a" in im.getbands() or "transparency" in im.info:
        rgba = im.convert("RGBA")  # palette or colour-key transparency becomes alpha here
        return Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return im.convert("RGB")


def _too_large(source: str, what: str, max_pixels: int, decoded: bool = False) -> KosmoError:
    when = "" if decoded else "refused before decoding "
    return KosmoError(f"{source}: image too large ({what}, limit {max_pixels:,} pixels); "
                      f"{when}(possible decompression bomb)")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _normalize(img: Image.Image) -> torch.Tensor:
    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div_(255)
    return (x - _MEAN) / _STD
