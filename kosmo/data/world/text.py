"""What is said about a scene: reference captions, paragraphs for the text corpus, and questions with their answers."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kosmo.data.world.scenes import COLOURS, SHAPES, Obj, Scene, Scenes, pick

QTYPES = ("colour", "shape", "count", "exist", "spatial", "size")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses", "object": "objects"}
SINGULAR = {v: k for k, v in PLURAL.items()}
# (sentence for the corpus, question, short answer): the corpus states what chats and alignment prompts ask
FACTS = (
    ("A triangle has three corners.", "How many corners does a triangle have?", "3"),
    ("A triangle has three sides.", "How many sides does a triangle have?", "3"),
    ("A square has four corners.", "How many corners does a square have?", "4"),
    ("A square has four sides.", "How many sides does a square have?", "4"),
    ("A circle has no corners.", "How many corners does a circle have?", "0"),
    ("A cross has four arms.", "How many arms does a cross have?", "4"),
    ("The grid has three rows.", "How many rows does the grid have?", "3"),
    ("The grid has three columns.", "How many columns does the grid have?", "3"),
    ("The grid has nine cells.", "How many cells does the grid have?", "9"),
    ("Mixing red and blue gives purple.", "What colour do red and blue make?", "purple"),
    ("Mixing blue and yellow gives green.", "What colour do blue and yellow make?", "green"),
    ("Mixing red and yellow gives orange.", "What colour do red and yellow make?", "orange"),
    ("A circle is round.", "Which shape is round?", "circle"),
    ("A cross looks like a plus sign.", "Which shape looks like a plus sign?", "cross"),
    ("In these pictures a triangle always points up.", "Which shape points up?", "triangle"),
)
_EXTRA_FACTS = ("If one object is to the left of another, the other is to the right of it.",
                "A large object is bigger than a small one.", "No two objects ever share a cell of the grid.",
                "Something above another thing is closer to the top of the picture.")


@dataclass(frozen=True)
class VQAItem:
    question: str
    answer: str  # one word, or a count as a digit
    qtype: str   # one of QTYPES


@dataclass(frozen=True)
class ChoiceItem:
    """A question with one right answer among `choices`, each read after `context` and a space."""
    context: str
    choices: tuple[str, ...]
    answer: int  # the right choice's index


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def capitalised(s: str) -> str:
    return s[:1].upper() + s[1:]


def joined(items: list[str]) -> str:
    """'a, b and c'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def relation(a: Obj, b: Obj) -> str:
    if a.col != b.col:
        return "to the left of" if a.col < b.col else "to the right of"
    return "above" if a.row < b.row else "below"


def listing(scene: Scene) -> str:
    return joined([f"{with_article(o.full)} {o.where}" for o in scene.objects])


class Language(Scenes):
    """Captions, corpus paragraphs and VQA about the world's scenes."""

    def captions(self, scene: Scene) -> list[str]:
        """Seven true reference captions in varied styles; the first is the most complete."""
        rng = self._scene_rng("caption", scene)
        objs = scene.objects
        shuffled = [objs[i] for i in rng.permutation(len(objs))]
        n = len(objs)
        count = "There is one object" if n == 1 else f"There are {NUMBERS[n]} objects"
        if n == 1:
            spatial = f"{capitalised(with_article(objs[0].name))} on its own {objs[0].where}."
        else:
            a, b = shuffled[:2]
            spatial = f"The {a.name} is {relation(a, b)} the {b.name}."
        colours = sorted({o.colour for o in objs})
        return [
            capitalised(listing(scene)) + ".",
            f"{count}: {joined([with_article(o.name) for o in shuffled])}.",
            " ".join(f"There is {with_article(o.full)} {o.where}." for o in shuffled),
            spatial,
            capitalised(joined([o.name for o in shuffled])) + " on a light background.",
            capitalised(joined([with_article(o.full) for o in shuffled])) + ".",
            f"The only colour besides the background is {colours[0]}." if len(colours) == 1
            else f"The picture shows the colours {joined(colours)}.",
        ]

    def text(self, index: int, split: str = "train") -> str:
        """A short paragraph for the text corpus: a described scene mixed with general facts of the world."""
        rng = self._rng("text", split, index)
        scene = self._sample_scene(rng, split)
        intro = pick(rng, ("Here is a picture.", "Imagine a small picture.", "This describes an image.",
                           "Look at this picture.", ""))
        templates = ("There is {a} {w}.", "{W}, there is {a}.", "{A} sits {w}.", "You can see {a} {w}.")
        body = []
        for o in scene.objects:
            a = with_article(o.full)
            body.append(pick(rng, templates).format(a=a, A=capitalised(a), w=o.where, W=capitalised(o.where)))
        objs = scene.objects
        if len(objs) > 1:
            i, j = rng.permutation(len(objs))[:2]
            body.append(f"The {objs[i].name} is {relation(objs[i], objs[j])} the {objs[j].name}.")
        many = f"{NUMBERS[len(objs)]} object" + "s" * (len(objs) > 1)
        body.append(pick(rng, (f"Altogether there {'are' if len(objs) > 1 else 'is'} {many}.",
                               f"The picture has {many} in total.")))
        facts = [FACTS[i][0] for i in rng.permutation(len(FACTS))[:2]] + [pick(rng, _EXTRA_FACTS)]
        facts = facts[: int(rng.integers(1, 4))]
        parts = facts + [intro] + body if rng.random() < 0.3 else [intro] + body + facts
        return " ".join(p for p in parts if p)

    def text_question(self, index: int, split: str = "val") -> ChoiceItem:
        """A multiple-choice question answered from text alone: a scene's fullest caption, then its VQA question
        about the colour (even indices) or the shape (odd ones) of an object, among all the world's colours or
        shapes."""
        scene = self.scene(index, split)
        qtype = ("colour", "shape")[index % 2]
        item = next(q for q in self.vqa(scene) if q.qtype == qtype)
        choices = tuple(COLOURS) if qtype == "colour" else SHAPES
        return ChoiceItem(f"{self.captions(scene)[0]} Question: {item.question} Answer:", choices,
                          choices.index(item.answer))

    def vqa(self, scene: Scene, rng: np.random.Generator | int | None = None) -> list[VQAItem]:
        """One unambiguous question of each type in QTYPES about the scene (rng or index picks the variants)."""
        if not isinstance(rng, np.random.Generator):
            rng = self._scene_rng("vqa", scene, *([] if rng is None else [1, int(rng)]))
        objs = scene.objects
        present = {(o.colour, o.shape) for o in objs}
        items = []
        o = pick(rng, objs)
        ref = (f"the {o.shape}" if sum(p.shape == o.shape for p in objs) == 1 and rng.random() < 0.7
               else f"the object {o.where}")
        items.append(VQAItem(f"What colour is {ref}?", o.colour, "colour"))
        o = pick(rng, objs)
        ref = (f"the {o.colour} object" if sum(p.colour == o.colour for p in objs) == 1 and rng.random() < 0.7
               else f"the object {o.where}")
        items.append(VQAItem(f"What shape is {ref}?", o.shape, "shape"))
        r = rng.random()
        if r < 1 / 3:
            q, n = "How many objects are there?", len(objs)
        elif r < 2 / 3:
            c = pick(rng, objs).colour if rng.random() < 0.7 else pick(rng, list(COLOURS))
            q, n = f"How many {c} objects are there?", sum(p.colour == c for p in objs)
        else:
            s = pick(rng, objs).shape if rng.random() < 0.7 else pick(rng, SHAPES)
            q, n = f"How many {PLURAL[s]} are there?", sum(p.shape == s for p in objs)
        items.append(VQAItem(q, str(n), "count"))
        if rng.random() < 0.5:
            c, s = pick(rng, objs).name.split()
            ans = "yes"
        else:
            # Scenes without held-out pairs never ask about them, so training text never names them either.
            pool = self._pools["all" if present & self.heldout_combos else "seen"]
            absent = [p for p in pool if p not in present]
            near = [p for p in absent if any(p[0] == x.colour or p[1] == x.shape for x in objs)]
            c, s = pick(rng, near if near and rng.random() < 0.7 else absent)
            ans = "no"
        items.append(VQAItem(f"Is there {with_article(f'{c} {s}')}?", ans, "exist"))
        want = rng.random() < 0.5
        if len(objs) > 1:
            i, j = rng.permutation(len(objs))[:2]
            a, b = objs[i], objs[j]
            rels = {"to the left of": a.col < b.col, "to the right of": a.col > b.col,
                    "above": a.row < b.row, "below": a.row > b.row}
            rel = pick(rng, [k for k, v in rels.items() if v == want] or list(rels))
            items.append(VQAItem(f"Is the {a.name} {rel} the {b.name}?", "yes" if rels[rel] else "no", "spatial"))
        else:
            a = objs[0]
            sides = {"on the left side": a.col == 0, "on the right side": a.col == 2,
                     "in the top row": a.row == 0, "in the bottom row": a.row == 2}
            side = pick(rng, [k for k, v in sides.items() if v == want] or list(sides))
            items.append(VQAItem(f"Is the {a.name} {side}?", "yes" if sides[side] else "no", "spatial"))
        o = pick(rng, objs)
        q = pick(rng, ("What size is the {}?", "Is the {} small or large?")).format(o.name)
        items.append(VQAItem(q, o.size, "size"))
        return items
