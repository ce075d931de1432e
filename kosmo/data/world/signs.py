"""Pictures with text in them: signs, number labels and price tags, set in a real font, and what is said and
asked about them.

A sign is a coloured plate on the world's light background with a short word ("OPEN"), a two-digit number ("37")
or a price ("$37") on it, in DejaVu Sans (Debian's fonts-dejavu-core; `make font-deps` installs it). The picture
is a 4 x 4 grid of cells and the text sits in one row of it, a character to a cell, as the shapes world's objects
sit one to a cell of its grid: a ViT whose patches are the cells (12 px patches of a 48 px picture) sees each
character in a patch of its own. Which row and cells, the plate colour, the background, the font weight and size
and a pixel of shift are drawn at random, so pictures of the same text differ. Text at any pixel offset is a
harder task than a small ViT learns in CPU minutes (docs/reading.md).

Reading is measured on text the training split never shows: a seeded fifth of the two-digit numbers (every
digit still seen in every place) is kept out of training, and every other split writes only those, as numbers
and prices. Words come from a closed list, so on held-out pictures a word is a new rendering of a known word.

With `sign_digits` above 2, training labels and prices also show longer numbers (up to 4 digits, a price up to
3), none holding a held-out number inside it. There are thousands of them, too many to learn as wholes, so a
model that answers them has to read them a digit at a time, the skill a held-out number needs.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from PIL import Image, ImageDraw

from kosmo.data.world.fonts import font
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
GRID = 4  # a picture is GRID x GRID cells, a character to a cell: give the ViT patches of image_size / GRID
_QUESTIONS = {"word": ("What does the sign say?", "What is written on the sign?", "What word is on the sign?"),
              "number": ("What number is written on the label?", "What number is on the label?",
                         "Which number does the label show?"),
              "price": ("What is the price?", "How much does it cost?", "What price is on the tag?")}


@dataclass(frozen=True)
class Sign:
    """What a sign picture shows and how it is drawn: its first character's grid cell (row, col), each later
    character in the next cell to the right, every character `shift` pixels (x, y) off its cell's centre."""
    kind: str   # one of SIGN_KINDS
    text: str
    plate: str  # a key of PLATES
    background: tuple[int, int, int]
    row: int
    col: int
    shift: tuple[int, int]
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
        if not 2 <= self.config.sign_digits <= GRID:
            raise KosmoError(f"signs: sign_digits must be 2 to {GRID}, got {self.config.sign_digits}")

    def _cell(self) -> int:
        size = self.config.image_size
        if size < 40:  # only a world that draws signs needs room for their text
            raise KosmoError(f"signs: image_size must be at least 40 to hold a sign's text, got {size}")
        return size // GRID

    def sign(self, index: int, split: str = "train") -> Sign:
        """The sign at (seed, split, index); the kinds take turns, so any three in a row hold one of each."""
        cell = self._cell()
        kind = SIGN_KINDS[int(index) % len(SIGN_KINDS)]
        rng = self._rng("sign", split, index)
        if kind == "word":
            text = pick(rng, WORDS)
        elif split == "train":
            text = ("$" if kind == "price" else "") + self._training_number(rng, GRID - (kind == "price"))
        else:
            text = ("$" if kind == "price" else "") + pick(rng, sorted(self.heldout_numbers))
        row, col = int(rng.integers(GRID)), int(rng.integers(GRID - len(text) + 1))
        shift = tuple(int(v) for v in rng.integers(-(cell // 12), cell // 12 + 1, size=2))
        font_size = int(rng.integers(cell * 11 // 12, cell * 13 // 12 + 1))  # 11-13 px in a 12-pixel cell
        return Sign(kind, text, pick(rng, list(PLATES)), background(rng), row, col, shift, font_size,
                    bool(rng.integers(2)))

    def _training_number(self, rng: np.random.Generator, room: int) -> str:
        """A number for a training sign: two digits, or with sign_digits above 2 a length from 2 to sign_digits
        (at most `room` cells) drawn evenly, its digits at random and redrawn while a held-out number is in it."""
        longest = min(self.config.sign_digits, room)
        length = 2 if longest == 2 else int(rng.integers(2, longest + 1))  # the default world draws as it did
        if length == 2:
            return pick(rng, self.seen_numbers)
        while True:
            text = str(int(rng.integers(10 ** (length - 1), 10 ** length)))
            if not any(text[i:i + 2] in self.heldout_numbers for i in range(length - 1)):
                return text

    def render_sign(self, sign: Sign) -> Image.Image:
        """The sign's picture: its plate over the text's cells, and each character centred in its cell."""
        cell = self._cell()
        img = Image.new("RGB", (cell * GRID, cell * GRID), sign.background)
        draw = ImageDraw.Draw(img)
        face = font(sign.font_size, sign.bold)
        plate, ink = PLATES[sign.plate]
        top, left = sign.row * cell, sign.col * cell
        draw.rectangle((left, top, left + len(sign.text) * cell - 1, top + cell - 1), fill=plate)
        for i, char in enumerate(sign.text):
            centre = (left + i * cell + cell // 2 + sign.shift[0], top + cell // 2 + sign.shift[1])
            draw.text(centre, char, font=face, fill=ink, anchor="mm")
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
