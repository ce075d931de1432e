"""What to draw: prompts for learning to draw a scene, and evaluation prompts whose pictures a program can check.

A training prompt is a true description of a training scene that names every object, at one of several levels of
detail (with or without positions and sizes, colours and shapes or shapes alone, a relation, a count), so that a
model learns to follow full and partial prompts alike.

An evaluation item follows one of GenEval's categories and carries a spec, a JSON-serialisable dict that
kosmo.eval.imagegen checks against the objects it finds in a picture. Its prompt is drawn from a held-out scene,
kept beside it, so every prompt is satisfiable in the world (no repeated colour and shape, at most one object a
cell). The spec of every category has "objects", a list of dicts each holding some of "shape", "colour", "size",
"row" and "col"; "count" adds "count" (how many objects match objects[0], exactly) and "position" adds "relation"
(objects[0] is "to the left of", "to the right of", "above" or "below" objects[1], by grid cell):

    single_object      "a large red circle in the top left corner": one object with all five given
    two_objects        "a circle and a square": two different shapes, each present
    count              "two triangles" or "three objects": exactly that many of the shape (or of any object)
    colour             "a green triangle": an object of that colour and shape
    position           "a red circle to the left of a blue square": both present, in that relation
    attribute_binding  "a red circle and a blue square": both colour-shape pairs present, not swapped
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from kosmo.data.world.scenes import SHAPES, Obj, Scene, background, pick
from kosmo.data.world.text import NUMBERS, PLURAL, Language, joined, relation, with_article
from kosmo.errors import KosmoError

CATEGORIES = ("single_object", "two_objects", "count", "colour", "position", "attribute_binding")
PROMPT_STYLES = ("full", "no_position", "no_size", "colour_shape", "shapes", "relation", "count")


@dataclass(frozen=True)
class DrawItem:
    """An evaluation prompt, its GenEval category, the spec a picture must satisfy and the scene it was drawn from."""
    prompt: str
    category: str
    spec: dict[str, Any]
    scene: Scene


def _attrs(o: Obj, *keys: str) -> dict[str, Any]:
    return {k: getattr(o, k) for k in keys}


def _counted(shapes: list[str]) -> str:
    """'two circles and a square': every shape with how many there are, in order of first mention."""
    counts = Counter(shapes)
    return joined([with_article(s) if n == 1 else f"{NUMBERS[n]} {PLURAL[s]}" for s, n in counts.items()])


def _objects(n: int) -> str:
    return f"{NUMBERS[n]} object" + "s" * (n != 1)


class Drawing(Language):
    """Prompts for drawing the world's scenes, and GenEval-style evaluation items."""

    def prompt_styles(self, scene: Scene) -> dict[str, str]:
        """The scene described at every level of detail that suits it, each true and naming every object."""
        rng = self._scene_rng("draw", scene)
        objs = [scene.objects[i] for i in rng.permutation(len(scene.objects))]
        n = len(objs)
        styles = {
            "full": joined([f"{with_article(o.full)} {o.where}" for o in objs]),
            "no_position": joined([with_article(o.full) for o in objs]),
            "no_size": joined([f"{with_article(o.name)} {o.where}" for o in objs]),
            "colour_shape": joined([with_article(o.name) for o in objs]),
            "shapes": _counted([o.shape for o in objs]),
        }
        if n == 2:
            a, b = objs
            styles["relation"] = f"{with_article(a.name)} {relation(a, b)} {with_article(b.name)}"
        if n > 1:  # a lone object's count is the colour_shape prompt with "one object" in front of it
            shapes = {o.shape for o in objs}
            styles["count"] = (f"{NUMBERS[n]} {PLURAL[objs[0].shape]}" if len(shapes) == 1 and rng.random() < 0.5
                               else _objects(n))
        return styles

    def draw_prompt(self, scene: Scene, index: int = 0) -> str:
        """A training prompt for drawing `scene`: one of its prompt_styles, picked by `index`."""
        styles = self.prompt_styles(scene)
        rng = self._scene_rng("draw", scene, 1, int(index))
        return styles[pick(rng, list(styles))]

    def _compose(self, rng: np.random.Generator, split: str, wants: list[dict[str, str]]) -> Scene:
        """A scene of one object per entry of `wants`, each with the attributes given there, in different cells
        and with different (colour, shape) pairs drawn from the split's pool."""
        pool = self._pools["all" if split == "heldout" else "seen"]
        cells = rng.permutation(9)[:len(wants)]
        used: set[tuple[str, str]] = set()
        objs = []
        for want, cell in zip(wants, cells):
            fits = [p for p in pool if p not in used and want.get("colour", p[0]) == p[0]
                    and want.get("shape", p[1]) == p[1]]
            if not fits:
                raise KosmoError(f"world: no (colour, shape) pair left for {want}")
            c, s = pick(rng, fits)
            used.add((c, s))
            size = want.get("size") or ("small", "large")[int(rng.integers(2))]
            objs.append(Obj(s, c, size, int(cell) // 3, int(cell) % 3))
        return Scene(tuple(sorted(objs, key=lambda o: (o.row, o.col))), background(rng))

    def draw_item(self, index: int, split: str = "val") -> DrawItem:
        """Evaluation item `index` of a split; the categories take turns, so any CATEGORIES-long run is balanced."""
        category = CATEGORIES[int(index) % len(CATEGORIES)]
        rng = self._rng("draw_item", split, index)
        cfg = self.config
        if category == "single_object" or category == "colour":
            scene = self._compose(rng, split, [{}])
            o = scene.objects[0]
            if category == "colour":
                return DrawItem(with_article(o.name), category, {"objects": [_attrs(o, "colour", "shape")]}, scene)
            return DrawItem(f"{with_article(o.full)} {o.where}", category,
                            {"objects": [_attrs(o, "shape", "colour", "size", "row", "col")]}, scene)
        if cfg.max_objects < 2 and category != "count":
            raise KosmoError(f"draw_item: the {category} category needs scenes of two objects; max_objects is 1")
        if category == "count":
            lo = min(2, cfg.max_objects)
            n = int(rng.integers(max(lo, cfg.min_objects), cfg.max_objects + 1))
            pool = self._pools["all" if split == "heldout" else "seen"]
            shapes = [s for s in SHAPES if sum(p[1] == s for p in pool) >= n]  # n colours of the shape are needed
            if rng.random() < 0.5 and shapes:
                shape = pick(rng, shapes)
                scene = self._compose(rng, split, [{"shape": shape}] * n)
                prompt = with_article(shape) if n == 1 else f"{NUMBERS[n]} {PLURAL[shape]}"
                return DrawItem(prompt, category, {"objects": [{"shape": shape}], "count": n}, scene)
            scene = self._compose(rng, split, [{}] * n)
            return DrawItem(_objects(n), category, {"objects": [{}], "count": n}, scene)
        # Two objects of different shapes (and, to bind attributes, different colours) in a random order.
        while True:
            scene = self._compose(rng, split, [{}, {}])
            a, b = (scene.objects[i] for i in rng.permutation(2))
            if a.shape != b.shape and (category != "attribute_binding" or a.colour != b.colour):
                break
        if category == "two_objects":
            return DrawItem(f"{with_article(a.shape)} and {with_article(b.shape)}", category,
                            {"objects": [_attrs(a, "shape"), _attrs(b, "shape")]}, scene)
        pair = {"objects": [_attrs(a, "colour", "shape"), _attrs(b, "colour", "shape")]}
        if category == "position":
            rel = relation(a, b)
            return DrawItem(f"{with_article(a.name)} {rel} {with_article(b.name)}", category,
                            {**pair, "relation": rel}, scene)
        return DrawItem(f"{with_article(a.name)} and {with_article(b.name)}", category, pair, scene)
