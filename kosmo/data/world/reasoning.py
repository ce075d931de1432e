"""Questions that take several steps, each with its exact answer and a worked answer (a scratchpad).

The scene is given as text after the question: a row of PLACES places, numbered from the left, each empty or holding
one object ("Row: at 1 is red circle; at 2 is empty place; at 3 is blue square; ..."). A place of the scene and an
entry of the worked answer are both six tokens, and the question comes first, so the entry about place k stands the
same distance after the scene's place k in every item: a worked answer can read each place at a fixed offset. Text, not a picture, so that several from-scratch models can be
trained and compared in CPU minutes (the setting of Lee et al. 2023); the row is wider than the pictures' 3x3 grid
so that out-of-distribution scenes can hold more objects. A question counts the objects of a colour or a shape on
one side of an anchor object: "How many red objects are left of the blue square?".

The worked answer (Nye et al. 2021) names the anchor's place, then checks every place in order, one entry each:
the place, what is there, whether it counts, and the count so far; it ends "so the answer is N". Every place gets
an entry, empty ones too, and every entry is five words, so a scene's worked answer has the same shape whatever
its number of objects: a scene with more objects than training saw asks for more of the same local checks, not
for positions or counts of entries never seen. The direct answer is the number alone.

In distribution a scene holds 3-6 objects; out of distribution 7-10, so there are more objects to check and the
counts run higher. Items are pure functions of (seed, split, index, ood), as everywhere in the world.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from kosmo.data.world.scenes import COLOURS, SHAPES, Obj, item_rng, pick

PLACES = 12
IN_DISTRIBUTION = (3, 6)       # objects per scene, both ends included
OUT_OF_DISTRIBUTION = (7, 10)
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

    def counts(self, place: int) -> bool:
        """Whether the object at `place` (0-based) is one the question counts."""
        o = self.places[place]
        side = place < self.anchor.col if self.relation == "left" else place > self.anchor.col
        return o is not None and side and self.value in (o.colour, o.shape)

    @property
    def answer(self) -> str:
        return str(sum(self.counts(p) for p in range(len(self.places))))

    @property
    def scene(self) -> str:
        return "Row: " + "; ".join(f"at {p + 1} is {o.name if o else EMPTY}" for p, o in enumerate(self.places)) + "."

    @property
    def question(self) -> str:
        what = f"{self.value} objects" if self.value in COLOURS else plural(self.value)
        return f"How many {what} are {self.relation} of the {self.anchor.name}?"

    @property
    def prompt(self) -> str:
        return f"{self.question} {self.scene}"

    @property
    def scratchpad(self) -> str:
        """The worked answer: the anchor's place, one five-word entry per place, then the answer."""
        entries, n = [f"the {self.anchor.name} is at {self.anchor.col + 1}."], 0
        for p, o in enumerate(self.places):
            n += self.counts(p)
            entries.append(f"{p + 1} {o.name if o else EMPTY} {'yes' if self.counts(p) else 'no'} {n}.")
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
    """The question at (seed, split, index), out of distribution with `ood`."""
    rng = item_rng(seed, "reasoning_ood" if ood else "reasoning", split, index)
    low, high = OUT_OF_DISTRIBUTION if ood else IN_DISTRIBUTION
    n = int(rng.integers(low, high + 1))
    pairs = [(c, s) for c in COLOURS for s in SHAPES]
    chosen = [pairs[i] for i in rng.permutation(len(pairs))[:n]]  # no (colour, shape) twice: names stay unique
    cells = sorted(int(c) for c in rng.permutation(PLACES)[:n])
    # sizes are not part of the text scene; every object is "small" so that equal scenes are equal objects
    objs = [Obj(s, c, "small", 0, cell) for (c, s), cell in zip(chosen, cells)]
    places: list[Obj | None] = [None] * PLACES
    for o in objs:
        places[o.col] = o
    relation = pick(rng, RELATIONS)
    # The anchor stands in the far half of the row's objects and the counted value is taken from an object on the
    # counted side, more often a shape (4 shapes, 6 colours): answers of 0 and 1 would otherwise be most of them.
    k = int(rng.integers(n // 2, n))
    k = k if relation == "left" else n - 1 - k
    side = objs[:k] if relation == "left" else objs[k + 1:]
    other = pick(rng, side)
    value = other.shape if rng.random() < 0.7 else other.colour
    return ReasoningItem(tuple(places), objs[k], value, relation, ood)


def parse_answer(reply: str) -> str:
    """The answer a reply gives: what follows the last "answer is" of a worked answer, else the whole reply."""
    reply = reply.strip()
    m = _ANSWER.search(reply)
    return m.group(1) if m else reply.rstrip(".")


def eval_record(item: ReasoningItem) -> dict:
    """An evaluation line: the prompt as a chat, the exact answer, and what the metrics are split by."""
    return {"messages": item.messages(think=False, answer=False), "answer": item.answer, "ood": item.ood,
            "objects": item.n_objects}

