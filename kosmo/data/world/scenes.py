"""Scenes and their pictures: what the world's objects are, how a scene is drawn at random, how it is rendered."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from functools import cache, cached_property
from typing import Any

import numpy as np
from PIL import Image

from kosmo.errors import KosmoError

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {  # far apart in RGB so a tiny ViT separates them after a few CPU minutes
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (40, 70, 225),
    "yellow": (240, 205, 20), "purple": (140, 50, 185), "orange": (245, 130, 20),
}
SIZES = ("small", "large")
SPLITS = {"train": 0, "val": 1, "test": 2, "heldout": 3}

_POSITIONS = (("in the top left corner", "in the top middle", "in the top right corner"),
              ("in the middle left", "in the centre", "in the middle right"),
              ("in the bottom left corner", "in the bottom middle", "in the bottom right corner"))
# Every kind of item draws from a random stream of its own, so that drawing more for one kind never shifts another.
_STREAMS = {"scene": 0, "text": 1, "vqa": 2, "interleaved": 3, "episode": 4, "chat": 5, "align": 6,
            "heldout": 7, "render": 8, "caption": 9, "draw": 10, "draw_item": 11, "sign": 12,
            "heldout_numbers": 13, "voice": 100, "sound": 101, "question_voice": 102, "mockup": 110,
            "mockup_render": 111, "reasoning": 120, "reasoning_ood": 121}


def item_rng(seed: int, kind: str, split: str, index: int) -> np.random.Generator:
    """The random stream for item `index` of a kind in a split of the world of `seed`."""
    if split not in SPLITS:
        raise KosmoError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return np.random.default_rng([seed, SPLITS[split], int(index), _STREAMS[kind]])


@dataclass(frozen=True)
class WorldConfig:
    """Everything that decides the world's contents; two worlds with equal configs produce equal bytes."""
    seed: int = 0
    image_size: int = 32
    min_objects: int = 1
    max_objects: int = 3
    noise: float = 0.0  # std of per-pixel Gaussian noise; 0 keeps colours exact, which tests and easy learning rely on
    sign_digits: int = 2  # the longest number a training sign shows (2 to 4); held-out numbers have two digits


@dataclass(frozen=True)
class Obj:
    """One shape in a scene and the grid cell (row, col) it occupies."""
    shape: str
    colour: str
    size: str
    row: int
    col: int

    @property
    def name(self) -> str:
        """'red circle': scenes never repeat a (colour, shape) pair, so this names the object uniquely."""
        return f"{self.colour} {self.shape}"

    @property
    def full(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"

    @property
    def where(self) -> str:
        return _POSITIONS[self.row][self.col]


@dataclass(frozen=True)
class Scene:
    """What a picture shows: objects in reading order and the background RGB."""
    objects: tuple[Obj, ...]
    background: tuple[int, int, int]

    @cached_property
    def id(self) -> str:
        """Content hash; names the PNG so a scene used in several files is written once."""
        key = repr((self.background, [(o.shape, o.colour, o.size, o.row, o.col) for o in self.objects]))
        return hashlib.sha1(key.encode()).hexdigest()[:16]


def pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]  # far faster than rng.choice on small Python sequences


def background(rng: np.random.Generator) -> tuple[int, int, int]:
    """A light, nearly grey background colour."""
    level = int(rng.integers(200, 236))
    return tuple(int(v) for v in np.clip(level + rng.integers(-8, 9, size=3), 0, 255))


@cache
def shape_masks(image_size: int) -> dict[tuple[str, str, int, int], np.ndarray]:
    """The pixels every (shape, size, row, col) covers in a picture of image_size pixels a side (read-only).

    Objects sit exactly at cell centres, so all 72 masks are computed once and rendering is a few copies.
    Centres snap to pixel corners: a shape then has the same symmetric pixels in every cell, so the masks of one
    shape and size are translations of each other.
    """
    s = image_size
    cell = s / 3
    ys, xs = np.mgrid[0:s, 0:s] + 0.5
    masks = {}
    for row in range(3):
        for col in range(3):
            dy, dx = ys - round((row + 0.5) * cell), xs - round((col + 0.5) * cell)
            for size, frac in (("small", 0.34), ("large", 0.47)):
                r = frac * cell
                arm = max(0.3 * r, 0.6)
                masks["circle", size, row, col] = dx**2 + dy**2 <= r * r
                masks["square", size, row, col] = (np.abs(dx) <= 0.8 * r) & (np.abs(dy) <= 0.8 * r)
                masks["triangle", size, row, col] = (np.abs(dx) <= (dy + r) * 0.55) & (dy <= 0.8 * r)
                masks["cross", size, row, col] = (((np.abs(dx) <= arm) & (np.abs(dy) <= r))
                                                  | ((np.abs(dy) <= arm) & (np.abs(dx) <= r)))
    for m in masks.values():
        m.flags.writeable = False
    return masks


class Scenes:
    """The world's config, its random streams, and its scenes and their pictures."""

    def __init__(self, config: WorldConfig | None = None, **overrides: Any):
        try:
            self.config = cfg = replace(config or WorldConfig(), **overrides)
        except TypeError as e:
            raise KosmoError(f"world: unknown config key in {sorted(overrides)}") from e
        if not 1 <= cfg.min_objects <= cfg.max_objects <= 9:
            raise KosmoError(f"world: need 1 <= min_objects <= max_objects <= 9, "
                             f"got {cfg.min_objects} and {cfg.max_objects}")
        if cfg.image_size < 12 or cfg.seed < 0:
            raise KosmoError(f"world: image_size must be >= 12 and seed >= 0, got {cfg.image_size}, {cfg.seed}")
        rng = np.random.default_rng([cfg.seed, _STREAMS["heldout"]])
        colours = [list(COLOURS)[i] for i in rng.permutation(len(COLOURS))]
        shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))]
        # Cycling a shuffled shape list gives every colour and every shape at least one held-out partner, so a
        # heldout episode about any attribute value can always be drawn, and train still sees every value.
        self.heldout_combos = frozenset((c, shapes[i % len(shapes)]) for i, c in enumerate(colours))
        every = [(c, s) for c in COLOURS for s in SHAPES]
        self._pools = {"all": every, "seen": [p for p in every if p not in self.heldout_combos],
                       "heldout": [p for p in every if p in self.heldout_combos]}
        self._masks = shape_masks(cfg.image_size)

    def _rng(self, kind: str, split: str, index: int) -> np.random.Generator:
        return item_rng(self.config.seed, kind, split, index)

    def _scene_rng(self, kind: str, scene: Scene, *extra: int) -> np.random.Generator:
        """The stream for what a kind derives from a scene itself, the same wherever the scene appears."""
        return np.random.default_rng([self.config.seed, _STREAMS[kind], int(scene.id, 16), *extra])

    def _sample_scene(self, rng: np.random.Generator, split: str, n_objects: int | None = None,
                      colour: str | None = None, shape: str | None = None, size: str | None = None) -> Scene:
        """Draw a scene; the first object obeys the given colour/shape/size and, in heldout, is a held-out pair."""
        cfg = self.config
        n = n_objects or int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        cells = rng.permutation(9)[:n]
        used: set[tuple[str, str]] = set()
        objs = []
        for k, cell in enumerate(cells):
            pool = self._pools[("heldout" if k == 0 else "all") if split == "heldout" else "seen"]
            if k == 0 and (colour or shape):
                pool = [p for p in pool if colour in (None, p[0]) and shape in (None, p[1])]
            c, s = pick(rng, [p for p in pool if p not in used])
            used.add((c, s))
            sz = size if k == 0 and size else SIZES[int(rng.integers(2))]
            objs.append(Obj(s, c, sz, int(cell) // 3, int(cell) % 3))
        return Scene(tuple(sorted(objs, key=lambda o: (o.row, o.col))), background(rng))

    def scene(self, index: int, split: str = "train") -> Scene:
        """The scene at (seed, split, index)."""
        return self._sample_scene(self._rng("scene", split, index), split)

    def render(self, scene: Scene) -> Image.Image:
        """Draw a scene as an RGB image of config.image_size pixels a side."""
        s = self.config.image_size
        img = np.empty((s, s, 3), np.uint8)
        img[:] = scene.background
        for o in scene.objects:
            img[self._masks[o.shape, o.size, o.row, o.col]] = COLOURS[o.colour]
        if self.config.noise > 0:
            rng = self._scene_rng("render", scene)
            img = np.clip(img + rng.normal(0, self.config.noise, img.shape), 0, 255).astype(np.uint8)
        return Image.fromarray(img)
