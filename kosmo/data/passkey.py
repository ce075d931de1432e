"""Passkey retrieval (Mohtashami & Jaggi 2023): a five-digit key hidden at some depth of a long run of
filler text, then asked for at the end. Answering needs attention that finds one sentence among tens of
thousands of tokens and copies from it, which is what a long context is for.

The LM stage trains on such rows (`passkey_rows`), and `kosmo eval needle` asks for keys over a grid of
context lengths and depths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kosmo.errors import KosmoError
from kosmo.tokenizer import BOS, Tokenizer

INTRO = "There is a pass key hidden inside a lot of irrelevant text. Find it and remember it."
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = (" The pass key is", ". Remember it.", " is the pass key.")  # the key goes after each of the first two
QUESTION = " What is the pass key? The pass key is"


@dataclass(frozen=True)
class Passkey:
    """One prompt: its ids, the key, the key's ids (the answer) and where the key first appears."""
    ids: list[int]
    key: str
    answer: list[int]
    key_at: int


class PasskeyPrompts:
    """Passkey prompts of an exact token length, built from pieces tokenised once.

    The filler is a tokenised paragraph repeated and cut to the length wanted, and the needle goes in at
    a token boundary of it, so the key's position is known exactly and a 32k-token prompt costs no
    tokenising."""

    def __init__(self, tokenizer: Tokenizer):
        self._enc = tokenizer.encode
        self.intro, self.filler, self.question = self._enc(INTRO), self._enc(FILLER), self._enc(QUESTION)
        self.needle_parts = [self._enc(part) for part in NEEDLE]

    def key_ids(self, key: str) -> list[int]:
        return self._enc(" " + key)

    def minimum(self, key: str = "00000") -> int:
        """The tokens of a prompt with no filler: <s>, the intro, the needle and the question."""
        return 1 + len(self.intro) + sum(map(len, self.needle_parts)) + 2 * len(self.key_ids(key)) + len(self.question)

    def prompt(self, length: int, depth: float, key: str) -> Passkey:
        """A prompt of exactly `length` tokens (its answer not included) with the needle at `depth` of the
        filler: 0 right after the intro, 1 right before the question."""
        if not 0 <= depth <= 1:
            raise KosmoError(f"a needle's depth is a fraction from 0 to 1, got {depth}")
        room = length - self.minimum(key)
        if room < 0:
            raise KosmoError(f"a passkey prompt needs at least {self.minimum(key)} tokens, got a length of {length}")
        filler = (self.filler * (room // len(self.filler) + 1))[:room]
        before = round(depth * room)
        answer = self.key_ids(key)
        pre, mid, post = self.needle_parts
        head = [BOS, *self.intro, *filler[:before], *pre]
        ids = head + answer + mid + answer + post + filler[before:] + self.question
        return Passkey(ids, key, answer, len(head))


def random_key(gen: torch.Generator) -> str:
    return str(int(torch.randint(10_000, 100_000, (1,), generator=gen)))


def passkey_row(prompts: PasskeyPrompts, length: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, labels) of `length` tokens each: a prompt with its needle at a random depth, then its
    answer. Every token is a target except the key's first appearance, which nothing predicts; its
    second, inside the needle, and the answer are copies."""
    key = random_key(gen)
    answer = prompts.key_ids(key)
    p = prompts.prompt(length + 1 - len(answer), float(torch.rand((), generator=gen)), key)
    row = torch.tensor(p.ids + p.answer)
    labels = row[1:].clone()
    labels[p.key_at - 1:p.key_at - 1 + len(answer)] = -100  # label t is the token at t + 1
    return row[:-1], labels
