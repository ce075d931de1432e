"""Perplexity: exp of the mean next-token cross-entropy over text packed as the LM stage packs it."""

from __future__ import annotations

import math

import torch

from kosmo.data.jsonl import iter_texts
from kosmo.train.lm import PackedText, lm_loss
from kosmo.train.trainer import to_device


@torch.no_grad()
def perplexity(model, tokenizer, data: list[str], seq_len: int = 256, batch_size: int = 8) -> dict:
    seq_len = min(seq_len, model.context_length)
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
