"""Prompt scoring for `echo`: the log-probability of every prompt token after those before it, which
lm-evaluation-harness's loglikelihood requests read, and the logits of the token after the prompt.

A prompt is scored by one forward pass of the model over all of it, the prompts of a request right-padded into
one batch (a causal model's real positions never see the padding after them). Scoring runs beside the engine,
not in its batch: the engine's cache holds rows being decoded a token at a time, and a scored prompt needs no
cache. The model's forward keeps no state, so the two threads share it safely; scoring batches run one at a
time, in the engine's precision. Probabilities are over the text vocabulary, as generation's are.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from kosmo.serve.engine import Engine
from kosmo.tokenizer import PAD

BATCH_TOKENS = 16_384  # padded positions one forward pass takes: more prompts than that run as several batches
HEAD_CHUNK = 1024  # positions whose vocabulary logits are held at once


@dataclass
class Scored:
    """One prompt's scores: entry t - 1 holds token t's log-probability after tokens 0..t-1, and the k likeliest
    tokens at t; token 0 has nothing before it and no entry. `next`: the (text vocabulary,) logits after the last
    token, which a reply of one token is sampled from."""
    logprobs: list[float]
    top: list[list[tuple[int, float]]]
    next: torch.Tensor


class Scorer:
    def __init__(self, engine: Engine):
        self.model, self.device, self.autocast = engine.model, engine.device, engine.autocast
        self.lock = threading.Lock()

    def __call__(self, prompts: list[list[int]], k: int) -> list[Scored]:
        out, batch = [], []
        for ids in prompts:
            if batch and (len(batch) + 1) * max(len(ids), *map(len, batch)) > BATCH_TOKENS:
                out += self._batch(batch, k)
                batch = []
            batch.append(ids)
        return out + self._batch(batch, k)

    @torch.no_grad()
    def _batch(self, prompts: list[list[int]], k: int) -> list[Scored]:
        idx = torch.full((len(prompts), max(map(len, prompts))), PAD, dtype=torch.long)
        for r, ids in enumerate(prompts):
            idx[r, :len(ids)] = torch.tensor(ids)
        idx = idx.to(self.device)
        with self.lock, torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
            h = self.model.hidden(idx)
            return [self._row(h[r, :len(ids)], idx[r, :len(ids)], k) for r, ids in enumerate(prompts)]

    def _row(self, h: torch.Tensor, ids: torch.Tensor, k: int) -> Scored:
        """The scores of a prompt's tokens `ids` (T,) from their hidden states (T, dim), a chunk of positions at a
        time; each position predicts the token after it, the last one the reply's first."""
        head, vocab = self.model.decoder.lm_head, self.model.text_vocab
        logprobs, top = [], []
        for s in range(0, len(ids), HEAD_CHUNK):
            logits = head(h[s:s + HEAD_CHUNK]).float()[:, :vocab]
            targets = ids[s + 1:s + 1 + HEAD_CHUNK]
            lp = logits[:len(targets)].log_softmax(-1)
            logprobs += lp.gather(-1, targets[:, None])[:, 0].tolist()
            if k:
                best = lp.topk(k)
                top += [list(zip(i, v)) for i, v in zip(best.indices.tolist(), best.values.tolist())]
            else:
                top += [[] for _ in range(len(lp))]
        return Scored(logprobs, top, logits[-1])
