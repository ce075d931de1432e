"""Induction documents: random token strings written twice.

The second half of such a document can be predicted only by finding where the current token occurred
before and copying what followed it, the induction circuit of Olsson et al. (2022). Real web text
teaches it through its many repeats; the shapes world's short sentences repeat too little, so an LM
meant to learn from examples in its context (as Flamingo's frozen LM must) pretrains on these beside
the world's text. Only tokens that decode to clean text and encode back to themselves are drawn, so
a document read back through the tokenizer is (almost) the same token string.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from kosmo.tokenizer import SPECIAL_TOKENS, Tokenizer


def clean_tokens(tok: Tokenizer) -> list[int]:
    """Ids past the special tokens that decode to valid text and encode back to themselves alone."""
    ids = []
    for i in range(len(SPECIAL_TOKENS), tok.vocab_size):
        text = tok.decode([i])
        if "\ufffd" not in text and tok.encode(text) == [i]:
            ids.append(i)
    return ids


def write_induction_documents(tok: Tokenizer, path: str | Path, n: int, seed: int = 0,
                              low: int = 12, high: int = 40) -> Path:
    """n JSONL documents {"text"}, each a string of low..high random tokens followed by itself."""
    if not 1 <= low <= high:
        raise ValueError(f"induction documents: need 1 <= low <= high, got {low}, {high}")
    pool = clean_tokens(tok)
    rng = random.Random(seed)
    path = Path(path)
    with path.open("w") as f:
        for _ in range(n):
            half = tok.decode([rng.choice(pool) for _ in range(rng.randint(low, high))])
            f.write(json.dumps({"text": half + half}) + "\n")
    return path
