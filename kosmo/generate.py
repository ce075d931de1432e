"""Autoregressive generation with a KV cache: greedy, temperature, top-k, top-p, stop strings and
batched prompts of different lengths (left-padded, with per-row positions and a key mask)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kosmo.model.lm import LM, KVCache
from kosmo.tokenizer import END_OF_TURN, EOS, PAD


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0            # 0: off
    top_p: float = 1.0        # 1: off
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Completion:
    tokens: list[int]
    text: str
    finish_reason: str  # "stop" or "length"


def filter_logits(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) on fp32 logits of shape (B, V)."""
    logits = logits.float() / s.temperature
    if s.top_k > 0:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop = probs.cumsum(-1) - probs > s.top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, s: Sampling, gen: torch.Generator | None) -> torch.Tensor:
    if s.temperature <= 0:
        return logits.argmax(-1)
    probs = filter_logits(logits, s).softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def left_pad(prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for i, p in enumerate(prompts):
        idx[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = True
    return idx.to(device), mask.to(device)


@torch.no_grad()
def generate_ids(model, prompts: list[list[int]], s: Sampling, stop_ids=(EOS, END_OF_TURN),
                 use_cache: bool = True, cache_dtype=None, return_logits: bool = False, should_stop=None,
                 images: torch.Tensor | None = None):
    """The decode loop, for an `LM` or a multimodal model with `.lm` and `forward(ids, images, ...)`.

    `images` go with the prompts' image markers in order; a model with `new_cache` makes a cache of
    its own (Flamingo's remembers the images). Returns per-row new token lists (stop token excluded),
    finish reasons and, if asked, the (B, V) logits of every step. `should_stop(row, tokens)` ends a
    row early.
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("a prompt is empty")
    lm: LM = getattr(model, "lm", model)
    device = next(lm.parameters()).device
    idx, key_mask = left_pad(prompts, device)
    B, width = idx.shape
    total = width + s.max_new_tokens
    if total > lm.cfg.max_seq_len:
        raise ValueError(f"prompt of {width} tokens + max_new_tokens {s.max_new_tokens} exceeds "
                         f"the context of {lm.cfg.max_seq_len} tokens")
    pos = (key_mask.long().cumsum(-1) - 1).clamp(min=0)
    padded = not bool(key_mask.all())  # without padding the plain causal path needs no mask at all
    new_cache = getattr(model, "new_cache", lambda *a, **kw: KVCache(lm.cfg, *a, **kw))
    cache = new_cache(B, total, dtype=cache_dtype or next(lm.parameters()).dtype, device=device) if use_cache else None

    # Past the prompt a KOSMOS model is its LM: a generated token is text, even an <|image_pad|>
    # sampled by mistake, which has no image to fill it (the serving engine decodes the same way).
    decoder = lm if hasattr(model, "embed_inputs") else model

    def run(ids, pos, cache, with_images: bool):
        media = {"images": images} if with_images and images is not None else {}
        return (model if media else decoder)(ids, pos=pos, key_mask=key_mask if padded else None, cache=cache,
                                             last_only=True, **media)[:, -1]

    gen = torch.Generator(device=device).manual_seed(s.seed) if s.seed is not None else None
    stop = torch.tensor(list(stop_ids), device=device)
    out = [[] for _ in range(B)]
    reasons = ["length"] * B
    done = torch.zeros(B, dtype=torch.bool, device=device)
    step_logits = []
    seq, step_in, step_pos = idx, idx, pos
    for _ in range(s.max_new_tokens):
        if use_cache:
            logits = run(step_in, step_pos, cache, with_images=cache.length == 0)
        else:
            logits = run(seq, pos, None, with_images=True)
        if return_logits:
            step_logits.append(logits.float())
        tok = next_tokens(logits, s, gen)
        hit = torch.isin(tok, stop) & ~done
        for i in (~done & ~hit).nonzero().flatten().tolist():
            out[i].append(int(tok[i]))
            if should_stop is not None and should_stop(i, out[i]):
                hit[i] = True
        for i in hit.nonzero().flatten().tolist():
            reasons[i] = "stop"
        done |= hit
        if bool(done.all()):
            break
        # rows already done keep decoding padding so the batch stays rectangular
        tok = tok.masked_fill(done, PAD)
        step_in, step_pos = tok[:, None], step_pos[:, -1:] + 1
        if not use_cache:
            seq, pos = torch.cat([seq, step_in], 1), torch.cat([pos, step_pos], 1)
        if padded:
            key_mask = torch.cat([key_mask, torch.ones(B, 1, dtype=torch.bool, device=device)], 1)
    return (out, reasons, step_logits) if return_logits else (out, reasons)


def generate(model, tokenizer, prompts: list[list[int]], s: Sampling, stop_ids=(EOS, END_OF_TURN),
             cache_dtype=None, images: torch.Tensor | None = None) -> list[Completion]:
    """Completions for a batch of tokenised prompts; stop strings are cut from the returned text."""
    # A stop string of L characters lies within the last L tokens (+3 for a character split into
    # bytes), so each step decodes a short tail instead of the whole completion.
    window = max((len(st) for st in s.stop), default=0) + 4

    def hits_stop(i, toks):
        tail = tokenizer.decode(toks[-window:])
        return any(st in tail for st in s.stop)

    out, reasons = generate_ids(model, prompts, s, stop_ids, cache_dtype=cache_dtype,
                                should_stop=hits_stop if s.stop else None, images=images)
    results = []
    for toks, reason in zip(out, reasons):
        text = tokenizer.decode(toks)
        for st in s.stop:
            if st in text:
                text = text[:text.index(st)]
        results.append(Completion(toks, text, reason))
    return results
