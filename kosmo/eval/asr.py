"""Transcription scores: word and character error rates, computed by `jiwer` on normalised text.

Both sides pass the same `normalise_transcript` first: lowercase, hyphens and slashes read as spaces, other
punctuation dropped (it is not spoken, so no ear can be asked to hear it), whitespace collapsed. The rates are
corpus-level, as jiwer and the literature compute them: total edits over total reference words (characters),
so a long sentence weighs more than a short one.
"""

from __future__ import annotations

import re

import jiwer

_SPACES = re.compile(r"[\s\-/_]+")
_UNSPOKEN = re.compile(r"[^\w' ]")  # keeps letters and digits of any script, and apostrophes (what's, o'clock)


def normalise_transcript(text: str) -> str:
    text = _UNSPOKEN.sub("", _SPACES.sub(" ", text.lower()))
    return " ".join(text.split())


def _pairs(references: list[str], hypotheses: list[str]) -> tuple[list[str], list[str]]:
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    refs = [normalise_transcript(r) for r in references]
    if not all(refs):
        raise ValueError("a reference is empty after normalisation: an error rate needs something to hear")
    return refs, [normalise_transcript(h) for h in hypotheses]


def wer(references: list[str], hypotheses: list[str]) -> float:
    """Word error rate: (substitutions + deletions + insertions) / reference words, over the whole corpus."""
    return float(jiwer.wer(*_pairs(references, hypotheses)))


def cer(references: list[str], hypotheses: list[str]) -> float:
    """Character error rate, spaces included, over the whole corpus."""
    return float(jiwer.cer(*_pairs(references, hypotheses)))
