"""Documents that interleave pictures and text: free layouts, few-shot episodes and picture recall."""
from __future__ import annotations

import random
from dataclasses import dataclass

from kosmo.data.world.scenes import COLOURS, SHAPES, SIZES, Scene, pick
from kosmo.data.world.text import NUMBERS, Language, joined, listing
from kosmo.errors import KosmoError

NONCE_WORDS = ("dax", "wug", "blicket", "fep", "toma", "zorp", "kiki", "gazzer", "mipen", "tufa", "norg", "plimb")
EPISODE_EXAMPLE = "This is a {label}."
EPISODE_QUERY = "This is a"
_ORDINALS = ("first", "second", "third", "fourth")


@dataclass(frozen=True)
class Segment:
    """A piece of an interleaved document: exactly one of text or scene is set."""
    text: str | None = None
    scene: Scene | None = None


def labelled(pairs: list[tuple[Scene, str]]) -> list[Segment]:
    """Each picture followed by 'This is a <label>.'"""
    return [seg for scene, label in pairs
            for seg in (Segment(scene=scene), Segment(text=EPISODE_EXAMPLE.format(label=label)))]


def asking(scene: Scene) -> list[Segment]:
    """A picture followed by 'This is a', for its label to complete."""
    return [Segment(scene=scene), Segment(text=EPISODE_QUERY)]


@dataclass
class Episode:
    """A few-shot classification episode whose nonce labels are drawn afresh for every document."""
    support: list[tuple[Scene, str]]
    query: tuple[Scene, str]
    labels: list[str]  # labels[i] names values[i] in this episode only
    values: list[str]
    attribute: str     # "shape", "colour" or "size"

    def document(self) -> tuple[list[Segment], str]:
        """The episode as '<image> This is a dax.' per example, ending '<image> This is a'; plus the completion."""
        return labelled(self.support) + asking(self.query[0]), self.query[1]

    def training_document(self) -> list[Segment]:
        """The episode with the query's label written out, for a model to learn to name it from the context."""
        return labelled(self.support + [self.query])


@dataclass
class Recall:
    """Picture recall, the barest episode: pictures each named by its own nonce word, then the same pictures
    again, shuffled, named again. Naming a picture the second time needs no rule, only matching it with the
    identical picture earlier and copying the word after that one."""
    named: list[tuple[Scene, str]]
    again: list[tuple[Scene, str]]

    @property
    def labels(self) -> list[str]:
        return [label for _, label in self.named]

    def training_document(self) -> list[Segment]:
        """Every picture named, both times."""
        return labelled(self.named + self.again)

    def document(self) -> tuple[list[Segment], str]:
        """The pictures named once, then the first repeated picture to be named; plus the completion."""
        scene, label = self.again[0]
        return labelled(self.named) + asking(scene), label


class Documents(Language):
    """Interleaved documents, few-shot episodes and picture recall made of the world's scenes."""

    def interleaved(self, index: int, split: str = "train") -> list[Segment]:
        """A document mixing text and 1-4 images in one of several layouts."""
        rng = self._rng("interleaved", split, index)
        layout = int(rng.integers(5))
        n = (int(rng.integers(2, 5)), int(rng.integers(1, 4)), 2, 1, int(rng.integers(1, 3)))[layout]
        scenes = [self._sample_scene(rng, split) for _ in range(n)]
        txt, pic = (lambda t: Segment(text=t)), (lambda s: Segment(scene=s))
        if layout == 0:
            doc = [txt(f"Here are {NUMBERS[n]} pictures.")]
            for k, s in enumerate(scenes):
                doc += [pic(s), txt(f"The {_ORDINALS[k]} picture shows {listing(s)}.")]
        elif layout == 1:
            doc = [seg for s in scenes for seg in (pic(s), txt(pick(rng, self.captions(s))))]
        elif layout == 2:
            a, b = scenes
            shared = sorted({o.colour for o in a.objects} & {o.colour for o in b.objects})
            doc = [txt("Compare these two pictures."), pic(a), pic(b), txt(
                f"The first picture has {NUMBERS[len(a.objects)]} object{'s' * (len(a.objects) > 1)} and the "
                f"second has {NUMBERS[len(b.objects)]}. " + (f"Both contain something {joined(shared)}."
                                                             if shared else "They share no colour."))]
        elif layout == 3:
            items = self.vqa(scenes[0], rng)
            qa = [items[k] for k in rng.permutation(len(items))[:2]]
            doc = [txt(pick(rng, ("Look at this picture.", "A quiz about an image."))), pic(scenes[0]),
                   txt(" ".join(f"Question: {it.question} Answer: {it.answer}." for it in qa))]
        else:
            doc = [seg for s in scenes for seg in (txt(f"Below is a picture of {listing(s)}."), pic(s))]
        return doc

    def episode(self, index: int, split: str = "train", shots: int = 4, n_way: int = 2) -> Episode:
        """A few-shot episode: one-object pictures labelled by an attribute's value, renamed with nonce words.

        When shots >= n_way the support shows every class, so the query's label is always among the support's.
        """
        if not 2 <= n_way <= len(COLOURS) or shots < 0:
            raise KosmoError(f"episode: need 2 <= n_way <= {len(COLOURS)} and shots >= 0, got {n_way}, {shots}")
        rng = self._rng("episode", split, index)
        domains = {"shape": SHAPES, "colour": tuple(COLOURS), "size": SIZES}
        attribute = pick(rng, [a for a, vals in domains.items() if len(vals) >= n_way])
        values = [domains[attribute][i] for i in rng.permutation(len(domains[attribute]))[:n_way]]
        labels = [NONCE_WORDS[i] for i in rng.permutation(len(NONCE_WORDS))[:n_way]]
        classes = list(range(n_way))[:shots] + [int(rng.integers(n_way)) for _ in range(shots - n_way)]
        classes = [classes[i] for i in rng.permutation(len(classes))]
        q = int(rng.integers(n_way))

        def draw(k: int) -> Scene:
            return self._sample_scene(rng, split, n_objects=1, **{attribute: values[k]})

        support = [(draw(k), labels[k]) for k in classes]
        return Episode(support, (draw(q), labels[q]), labels, values, attribute)

    def recall(self, index: int, split: str = "train", pictures: int = 4) -> Recall:
        """The scenes at pictures * index onwards, each named by a different nonce word, then all of them again."""
        rng = random.Random(f"recall-{split}-{index}")
        named = list(zip([self.scene(pictures * index + j, split) for j in range(pictures)],
                         rng.sample(NONCE_WORDS, pictures)))
        return Recall(named, rng.sample(named, pictures))
