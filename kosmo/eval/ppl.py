"""The LM's own measurements: perplexity (exp of the mean next-token cross-entropy) and copying."""

from __future__ import annotations

import math

import torch

from kosmo.data.jsonl import iter_texts
from kosmo.tokenizer import SPECIAL_TOKENS
from kosmo.train.lm import PackedText, lm_loss
from kosmo.train.trainer import to_device


@torch.no_grad()
def perplexity(model, tokenizer, data: list[str], seq_len: int = 256, batch_size: int = 8) -> dict:
    seq_len = min(seq_len, model.cfg.max_seq_len)
    packed = PackedText.from_texts(iter_texts(data), tokenizer, seq_len)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(packed), batch_size):
        batch = to_device(packed.collate(list(range(start, min(start + batch_size, len(packed))))), device)
        loss, _ = lm_loss(model, batch)
        total += float(loss)
        count += batch["n_targets"]
    mean = total / count
    return {"loss": round(mean, 5), "ppl": round(math.exp(mean), 4), "tokens": count}


@torch.no_grad()
def copy_accuracy(model, vocab_size: int, spans=(20, 48), rows: int = 64, seed: int = 0) -> dict:
    """The share (%) of a repeat the LM predicts, per span length: rows of random tokens written twice,
    scored past the repeat's first token. It measures the induction circuit (Olsson et al. 2022) that
    in-context learning builds on; an LM without one scores about 0. Spans whose rows do not fit the
    model's context are left out."""
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    scores = {}
    for span in (s for s in spans if 2 * s - 1 <= model.cfg.max_seq_len):
        first = torch.randint(len(SPECIAL_TOKENS), vocab_size, (rows, span), generator=gen)
        ids = torch.cat([first, first], 1).to(device)
        predicted = model(ids[:, :-1]).argmax(-1)
        scores[str(span)] = round(100 * (predicted[:, span:] == ids[:, span + 1:]).float().mean().item(), 1)
    return scores
