"""Questions that take several steps, each with its exact answer and a worked answer (a scratchpad).

The scene is given as text after the question: a row of PLACES places, labelled A to L from the left, each empty or
holding one object ("Row: A red circle; B empty place; C blue square; ..."). Text, not a picture, so that several
from-scratch models can be trained and compared in CPU minutes (the setting of Lee et al. 2023); the row is wider
than the pictures' 3x3 grid so that out-of-distribution scenes can hold more objects. A question counts the objects
of a colour or a shape on one side of an anchor object: "How many red objects are left of the blue square?".

The worked answer (Nye et al. 2021) first restates the question in the scene's words, with the anchor's label
("count circle left of the blue square at H."), then checks every place in order, one entry each: the place's
label and what is there, copied from the scene word for word; the side of the anchor it stands on (left, here,
right); the value counted; whether it counts; and the count so far ("F blue circle left circle yes 1."). It ends
"so the answer is N". Each step is local, so that a small model can learn it: a label occurs once in the scene, so
copying what follows it is the induction-head lookup, and the anchor's label is what precedes the anchor's name
there; the side follows from the previous entry's side and whether this entry's label is the anchor's; the value
is the previous entry's; the verdict compares it with the object two and three words before it, given the side;
the count follows from the previous count and the verdict. Every place gets an entry, empty ones too, and every
entry is seven words, so a scene's worked answer has the same shape whatever its number of objects. The direct
answer is the number alone.

In distribution a scene holds 3-6 objects; out of distribution 7-10, so there are more objects to check, more of
them on the counted side that do not count. The answer is drawn first, evenly from 0 to MAX_ANSWER in and out of
distribution alike: no constant reply scores much, and every running count out of distribution is one training
wrote. Items are pure functions of (seed, split, index, ood), as everywhere in the world.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from kosmo.data.world.scenes import COLOURS, SHAPES, Obj, item_rng, pick

PLACES = 12
LABELS = "ABCDEFGHIJKL"        # one per place: each occurs once in a scene, unlike numbers, which also count
IN_DISTRIBUTION = (3, 6)       # objects per scene, both ends included
OUT_OF_DISTRIBUTION = (7, 10)
MAX_ANSWER = 4                 # answers run 0..MAX_ANSWER in and out of distribution
THINK = "Think step by step."  # the system prompt that asks a chat model for the worked answer
RELATIONS = ("left", "right")
EMPTY = "empty place"          # two words, like an object's name, so that every entry has the same length
_ANSWER = re.compile(r"answer is\s+(\S+?)[.\s]*$")


@dataclass(frozen=True)
class ReasoningItem:
    """A question about a row of places: what each place holds (None: empty), the question, its anchor object,
    the attribute value counted (a colour or a shape), the side, and the exact answer."""
    places: tuple[Obj | None, ...]
    anchor: Obj
    value: str
    relation: str
    ood: bool

    @property
    def n_objects(self) -> int:
        return sum(o is not None for o in self.places)

    def side(self, place: int) -> str:
        """Where `place` (0-based) stands from the anchor: left, here or right."""
        return "left" if place < self.anchor.col else "here" if place == self.anchor.col else "right"

    def counts(self, place: int) -> bool:
        """Whether the object at `place` (0-based) is one the question counts."""
        o = self.places[place]
        return o is not None and self.side(place) == self.relation and self.value in (o.colour, o.shape)

    @property
    def answer(self) -> str:
        return str(sum(self.counts(p) for p in range(len(self.places))))

    @property
    def scene(self) -> str:
        return "Row: " + "; ".join(f"{LABELS[p]} {o.name if o else EMPTY}" for p, o in enumerate(self.places)) + "."

    @property
    def question(self) -> str:
        what = f"{self.value} objects" if self.value in COLOURS else plural(self.value)
        return f"How many {what} are {self.relation} of the {self.anchor.name}?"

    @property
    def prompt(self) -> str:
        return f"{self.question} {self.scene}"

    @property
    def scratchpad(self) -> str:
        """The worked answer: the question restated in the scene's words with the anchor's label, one seven-word
        entry per place, then the answer."""
        entries, n = [f"count {self.value} {self.relation} of the {self.anchor.name} at {LABELS[self.anchor.col]}."], 0
        for p, o in enumerate(self.places):
            n += self.counts(p)
            verdict = "yes" if self.counts(p) else "no"
            entries.append(f"{LABELS[p]} {o.name if o else EMPTY} {self.side(p)} {self.value} {verdict} {n}.")
        return " ".join(entries) + f" so the answer is {n}."

    def messages(self, think: bool, system: bool = False, answer: bool = True) -> list[dict]:
        """The item as a chat: the worked answer if `think` else the number; `system` puts THINK before it
        (the form a chat model that knows both is switched by); without `answer`, the prompt alone."""
        out = [{"role": "system", "content": THINK}] if system else []
        out.append({"role": "user", "content": self.prompt})
        if answer:
            out.append({"role": "assistant", "content": self.scratchpad if think else self.answer})
        return out


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def reasoning_item(seed: int, split: str, index: int, ood: bool = False) -> ReasoningItem:
    """The question at (seed, split, index), out of distribution with `ood`.

    The answer is drawn first, then the number of objects on the counted side (at least the answer), then which of
    them have the counted value: exactly `answer` do. The anchor and the objects beyond it are any others."""
    rng = item_rng(seed, "reasoning_ood" if ood else "reasoning", split, index)
    low, high = OUT_OF_DISTRIBUTION if ood else IN_DISTRIBUTION
    n = int(rng.integers(low, high + 1))
    answer = int(rng.integers(0, min(MAX_ANSWER, n - 1) + 1))
    counted = int(rng.integers(max(answer, 1), n))        # objects on the counted side, the anchor not among them
    value = pick(rng, SHAPES) if rng.random() < 0.7 else pick(rng, tuple(COLOURS))
    pairs = [(c, s) for c in COLOURS for s in SHAPES]     # no (colour, shape) twice: names stay unique
    has = [p for p in pairs if value in p]
    lacks = [p for p in pairs if value not in p]
    side = [has[i] for i in rng.permutation(len(has))[:answer]] + \
        [lacks[i] for i in rng.permutation(len(lacks))[:counted - answer]]
    rest = [p for p in pairs if p not in side]
    others = [rest[i] for i in rng.permutation(len(rest))[:n - counted]]  # the anchor, then the far side
    side = [side[i] for i in rng.permutation(len(side))]
    relation = pick(rng, RELATIONS)
    chosen = side + others if relation == "left" else others[1:] + others[:1] + side
    cells = sorted(int(c) for c in rng.permutation(PLACES)[:n])
    # sizes are not part of the text scene; every object is "small" so that equal scenes are equal objects
    objs = [Obj(s, c, "small", 0, cell) for (c, s), cell in zip(chosen, cells)]
    places: list[Obj | None] = [None] * PLACES
    for o in objs:
        places[o.col] = o
    anchor = objs[counted] if relation == "left" else objs[n - counted - 1]
    return ReasoningItem(tuple(places), anchor, value, relation, ood)


def parse_answer(reply: str) -> str:
    """The answer a reply gives: what follows the last "answer is" of a worked answer, else the whole reply."""
    reply = reply.strip()
    m = _ANSWER.search(reply)
    return m.group(1) if m else reply.rstrip(".")


def eval_record(item: ReasoningItem) -> dict:
    """An evaluation line: the prompt as a chat, the exact answer, and what the metrics are split by."""
    return {"messages": item.messages(think=False, answer=False), "answer": item.answer, "ood": item.ood,
            "objects": item.n_objects}

