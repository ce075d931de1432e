"""Pictures with text in them: signs, number labels and price tags, set in a real font, and what is said and
asked about them.

A sign is a coloured plate on the world's light background with a short word ("OPEN"), a two-digit number ("37")
or a price ("$37") on it, in DejaVu Sans (Debian's fonts-dejavu-core; `make font-deps` installs it). Its plate
colour, font size and weight, the background and the place (a few pixels about the middle) are jittered, so
pictures of the same text differ.

Reading is measured on text the training split never shows: a seeded fifth of the two-digit numbers (every
digit still seen in every place) is kept out of training, and every other split writes only those, as numbers
and prices. Words come from a closed list, so on held-out pictures a word is a new rendering of a known word.
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from kosmo.data.world.scenes import _STREAMS, Scenes, background, pick
from kosmo.data.world.text import VQAItem, capitalised, with_article
from kosmo.errors import KosmoError

SIGN_KINDS = ("word", "number", "price")
WORDS = ("OPEN", "STOP", "EXIT", "SALE", "PUSH", "PULL", "FREE", "TAXI", "PARK", "MILK", "BUS", "HOT", "COLD", "WAY",
         "IN", "OUT")
# plate colour -> ink: dark text on light plates, white on dark ones, so the text always stands out
PLATES = {"white": ((250, 250, 250), (20, 20, 20)), "yellow": ((240, 205, 20), (20, 20, 20)),
          "orange": ((245, 130, 20), (20, 20, 20)), "red": ((200, 30, 30), (255, 255, 255)),
          "green": ((30, 130, 50), (255, 255, 255)), "blue": ((40, 70, 200), (255, 255, 255)),
          "black": ((25, 25, 25), (255, 255, 255))}
NUMBERS = tuple(str(n) for n in range(10, 100))
FONT_DIRS = ("/usr/share/fonts/truetype/dejavu",)
_FONTS = {False: ("DejaVuSans.ttf", "DejaVu Sans"), True: ("DejaVuSans-Bold.ttf", "DejaVu Sans:bold")}
_QUESTIONS = {"word": ("What does the sign say?", "What is written on the sign?", "What word is on the sign?"),
              "number": ("What number is written on the label?", "What number is on the label?",
                         "Which number does the label show?"),
              "price": ("What is the price?", "How much does it cost?", "What price is on the tag?")}


@cache
def font_path(bold: bool) -> Path:
    """DejaVu Sans (bold or regular): from Debian's fonts-dejavu-core directory, else wherever fontconfig has it."""
    file, pattern = _FONTS[bold]
    for folder in FONT_DIRS:
        if (Path(folder) / file).is_file():
            return Path(folder) / file
    if shutil.which("fc-match"):
        found = subprocess.run(["fc-match", "-f", "%{file}", pattern], capture_output=True, text=True).stdout
        if Path(found).name == file:  # fc-match always answers; a substitute font would be a different world
            return Path(found)
    raise KosmoError(f"signs: font {file} not found; install fonts-dejavu-core (`make font-deps` does)")


@cache
def _font(bold: bool, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(font_path(bold)), size)


def _pad(image_size: int) -> int:
    """The plate's margin around the text: small, so that a four-letter word fits a 48-pixel picture."""
    return max(2, image_size // 24)


@dataclass(frozen=True)
class Sign:
    """What a sign picture shows and how it is drawn: the text's centre (cx, cy) in pixels and its font."""
    kind: str   # one of SIGN_KINDS
    text: str
    plate: str  # a key of PLATES
    background: tuple[int, int, int]
    cx: int
    cy: int
    font_size: int
    bold: bool

    @cached_property
    def id(self) -> str:
        """Content hash, prefixed so that it never collides with a scene's; names the PNG."""
        return "sign_" + hashlib.sha1(repr(self).encode()).hexdigest()[:16]


class Signs(Scenes):
    """Signs, their pictures, captions and reading questions."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        rng = np.random.default_rng([self.config.seed, _STREAMS["heldout_numbers"]])
        # Two shifts of the units digit against the tens digit: each tens digit loses two units digits and each
        # units digit two tens digits, so the held-out numbers are new pairs of digits all seen in their places.
        shifts = rng.permutation(10)[:2]
        self.heldout_numbers = frozenset(f"{t}{(t + s) % 10}" for t in range(1, 10) for s in shifts)
        self.seen_numbers = tuple(n for n in NUMBERS if n not in self.heldout_numbers)

    def sign(self, index: int, split: str = "train") -> Sign:
        """The sign at (seed, split, index); the kinds take turns, so any three in a row hold one of each."""
        size = self.config.image_size
        if size < 40:  # only a world that draws signs needs room for their text
            raise KosmoError(f"signs: image_size must be at least 40 to hold a sign's text, "
                             f"got {self.config.image_size}")
        kind = SIGN_KINDS[int(index) % len(SIGN_KINDS)]
        rng = self._rng("sign", split, index)
        numbers = self.seen_numbers if split == "train" else sorted(self.heldout_numbers)
        text = pick(rng, WORDS) if kind == "word" else ("$" if kind == "price" else "") + pick(rng, numbers)
        # as large as the text fits: a four-letter word at 11-13 px in a 48-pixel picture, a number at 14-16 px
        lo, hi = (11, 13) if kind == "word" else (14, 16)
        font_size = int(rng.integers(size * lo // 48, size * hi // 48 + 1))
        bold = bool(rng.integers(2))
        left, top, right, bottom = _font(bold, font_size).getbbox(text, anchor="mm")
        pad = _pad(size)
        # Near the middle, a sixteenth of the picture either way, and always a pixel clear of its edge (the
        # text's box lies around its centre): a sign anywhere in the picture is a harder reading task than a
        # small ViT learns in CPU minutes (docs/reading.md).
        dx, dy = (int(v) for v in rng.integers(-(size // 16), size // 16 + 1, size=2))
        x0, y0 = 1 + pad - left, 1 + pad - top
        cx = int(np.clip(size // 2 + dx, x0, max(x0, size - 2 - pad - right)))
        cy = int(np.clip(size // 2 + dy, y0, max(y0, size - 2 - pad - bottom)))
        return Sign(kind, text, pick(rng, list(PLATES)), background(rng), cx, cy, font_size, bold)

    def render_sign(self, sign: Sign) -> Image.Image:
        """The sign's picture: its plate, just larger than the text, and the text on it."""
        size = self.config.image_size
        img = Image.new("RGB", (size, size), sign.background)
        draw = ImageDraw.Draw(img)
        font = _font(sign.bold, sign.font_size)
        left, top, right, bottom = draw.textbbox((sign.cx, sign.cy), sign.text, font=font, anchor="mm")
        pad = _pad(size)
        plate, ink = PLATES[sign.plate]
        draw.rectangle((left - pad, top - pad, right + pad, bottom + pad), fill=plate)
        draw.text((sign.cx, sign.cy), sign.text, font=font, fill=ink, anchor="mm")
        return img

    def sign_captions(self, sign: Sign) -> list[str]:
        """Three true captions, each with the text as written; the first names the plate's colour too."""
        t, plate = sign.text, sign.plate
        if sign.kind == "word":
            return [f"{capitalised(with_article(plate))} sign that says {t}.", f"The sign reads {t}.",
                    f"{t} is written on a sign."]
        if sign.kind == "number":
            return [f"{capitalised(with_article(plate))} label with the number {t}.", f"The label shows {t}.",
                    f"The number {t} on a label."]
        return [f"{capitalised(with_article(plate))} price tag that says {t}.", f"The price is {t}.",
                f"A price tag: {t}."]

    def sign_question(self, sign: Sign, index: int = 0) -> VQAItem:
        """The reading question about a sign; its answer is the text as written, its type the sign's kind."""
        questions = _QUESTIONS[sign.kind]
        return VQAItem(questions[int(index) // len(SIGN_KINDS) % len(questions)], sign.text, sign.kind)
