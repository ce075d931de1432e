"""Copy accuracy: how much of a repeated span of random tokens an LM predicts, per span length. It
measures the induction circuit that in-context learning builds on; an LM without one scores about 0.

    kosmo eval copy --model runs/lm-icl [--spans 20,48]
"""

from __future__ import annotations

import torch

from kosmo.data.copying import repeated_spans
from kosmo.errors import KosmoError


@torch.no_grad()
def copy_accuracy(model, vocab_size: int, spans=(20, 48), rows: int = 64, seed: int = 0) -> dict:
    """{span: the share (%) of its repeat predicted} on rows of random tokens written twice, scored
    past the repeat's first token (which nothing before it predicts)."""
    for span in spans:
        if span < 2:  # a span of one token has no token after its repeat's first to predict
            raise KosmoError(f"a repeated span needs at least 2 tokens, got {span}")
        if 2 * span - 1 > model.context_length:
            raise KosmoError(f"a span of {span} tokens and its repeat need {2 * span - 1} positions, "
                             f"more than the model's context of {model.context_length}; pass shorter --spans")
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    scores = {}
    for span in spans:
        ids, _ = repeated_spans(rows, span, vocab_size, gen)
        ids = ids.to(device)
        predicted = model(ids[:, :-1]).argmax(-1)
        scores[str(span)] = round(100 * (predicted[:, span:] == ids[:, span + 1:]).float().mean().item(), 1)
    return scores
