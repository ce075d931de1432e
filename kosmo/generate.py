"""Autoregressive generation with a KV cache: greedy, temperature, top-k, top-p, stop strings and
batched prompts of different lengths, each row of the cache at its own length."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field

import torch

from kosmo.model.causal_lm import CausalLM
from kosmo.tokenizer import AUDIO_PAD, BEGIN_OF_IMAGE, END_OF_IMAGE, END_OF_TURN, EOS, IMAGE, IMAGE_PAD, PAD


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


def is_greedy(temperature: float) -> bool:
    """Temperature 0, or one below fp32's smallest normal number, which logits cannot be divided by without
    overflowing: the likeliest token is taken."""
    return temperature < torch.finfo(torch.float32).tiny


def filter_logits(logits: torch.Tensor, s: Sampling) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) on fp32 logits of shape (B, V)."""
    logits = logits.float()
    # the likeliest shifted to 0 first: a temperature near 0 then sends the others towards -inf, where
    # dividing the logits themselves would overflow to inf and leave the softmax nan
    logits = (logits - logits.amax(-1, keepdim=True)) / s.temperature
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


# Positions an image or a clip fills, and padding: a model reads these ids but never writes them. A sampled
# one would claim embeddings nobody gave (a random or barely trained model can put them on top). Nor does
# text open a picture to draw: drawing (`kosmo.draw`) writes the markers and the codes between them, and
# text generation sees only the logits of the text vocabulary (`CausalLM.text_vocab`).
NEVER_WRITTEN = (PAD, IMAGE_PAD, AUDIO_PAD, BEGIN_OF_IMAGE, END_OF_IMAGE)


@functools.cache
def _never_written(device: torch.device) -> torch.Tensor:
    return torch.tensor(NEVER_WRITTEN, device=device)  # made once per device, not at every decode step


def next_tokens(logits: torch.Tensor, s: Sampling, gen: torch.Generator | None) -> torch.Tensor:
    """(B,) next tokens from (B, V) logits: greedy at temperature 0 (`is_greedy`), else sampled after
    `filter_logits`."""
    # a compiled step (`decode_greedy`) takes the ids as a constant of its graph
    ids = torch.tensor(NEVER_WRITTEN, device=logits.device) if torch.compiler.is_compiling() else \
        _never_written(logits.device)
    logits = logits.index_fill(-1, ids, float("-inf"))
    if is_greedy(s.temperature):
        return logits.argmax(-1)
    probs = filter_logits(logits, s).softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def right_pad(rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, width) ids padded on the right, and each row's length (B,)."""
    lengths = torch.tensor([len(r) for r in rows])
    idx = torch.full((len(rows), int(lengths.max())), PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return idx.to(device), lengths.to(device)


# ids whose positions an image or a clip fills: a prefill chunk boundary never falls before one of them
PLACEHOLDERS = (IMAGE, IMAGE_PAD, AUDIO_PAD)


def prefill_spans(idx: torch.Tensor, chunk: int | None, media: bool = False) -> list[tuple[int, int]]:
    """The column spans [start, stop) in which a prefill of ids (B, width) runs: chunks of `chunk`
    columns (None or 0: all at once). Images and audio (`media`) come with the first chunk, so it
    stretches through the last placeholder of any row; only the text after it is chunked."""
    width = idx.shape[1]
    if not chunk or chunk >= width:
        return [(0, width)]
    first = chunk
    if media:
        cols = torch.isin(idx, torch.tensor(PLACEHOLDERS, device=idx.device)).any(0).nonzero()
        if len(cols):
            first = max(first, int(cols[-1]) + 1)
    return [(0, first)] + [(s, min(s + chunk, width)) for s in range(first, width, chunk)]


def prefill(model: CausalLM, idx: torch.Tensor, lengths: torch.Tensor, cache, images=None, audio=None,
            chunk: int | None = None) -> torch.Tensor:
    """Runs right-padded prompts idx (B, width) of `lengths` (B,) into an empty `cache` and returns the
    (B, V) logits after each row's last token. With `chunk`, the prompts go in as cached forwards of
    `chunk` columns each (`prefill_spans`), so the activations are one chunk's, not the whole prompt's;
    a row whose prompt ended in an earlier chunk adds nothing in the later ones (n_new of 0)."""
    out = None
    for start, stop in prefill_spans(idx, chunk, images is not None or audio is not None):
        cols = torch.arange(start, stop, device=idx.device)
        last = cols == (lengths - 1)[:, None]
        first = start == 0
        logits = model(idx[:, start:stop], images if first else None, audio if first else None, cache=cache,
                       n_new=(lengths - start).clamp(0, stop - start), logits_at=last)
        if out is None:
            out = logits.new_empty(idx.shape[0], logits.shape[-1])
        out[last.any(1)] = logits
    return out


def decode_logits(model: CausalLM, cache, tok: torch.Tensor) -> torch.Tensor:
    """The (B, V) logits of the text vocabulary after feeding tok (B,), one token to each row of the cache."""
    return model.decode_step(tok, cache)[:, :model.text_vocab]


GREEDY = Sampling(temperature=0.0)


def decode_greedy(model: CausalLM, cache, tok: torch.Tensor) -> torch.Tensor:
    """The (B,) greedy next tokens after feeding tok: compiled, the step and its choice are one graph, and
    only the chosen tokens come back to the host."""
    return next_tokens(decode_logits(model, cache, tok), GREEDY, None)


@functools.cache
def compiled(decode, device_type: str):
    """A decode step (`decode_logits`, `decode_greedy`) under `torch.compile`: over a static cache
    (`KVCache(static=True)`) it has fixed shapes and reads nothing back to the host, so each model and
    cache shape compiles once into one graph, with its elementwise work fused and no Python run per
    layer. Inductor's freezing takes the weights as constants, so it is for inference: a model whose
    weights then change must be compiled again (`torch._dynamo.reset()`).

    On a CPU a step at batch 1 is matrix-vector products, one pass over every weight. Inductor's C++
    GEMM templates run them over weights it packs once, when freezing, with vector micro-kernels; at
    these shapes they beat oneDNN's (`mkldnn._linear_pointwise`) severalfold. `max_autotune` times
    both for every shape while compiling and keeps the faster. `cpp_wrapper` calls the step's kernels
    from generated C++ rather than from a Python function, which saves about a tenth of a batch-1 step."""
    import torch._inductor.config

    options = {"freezing": True}
    if device_type == "cpu":
        options |= {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN", "cpp_wrapper": True}
    step = torch.compile(decode, dynamic=False, options=options)

    def frozen_step(model: CausalLM, cache, tok: torch.Tensor) -> torch.Tensor:
        # Dynamo reads the global flag while tracing to lift the weights as constants; `options` reach
        # only Inductor, so without this the weights would stay graph inputs and nothing would freeze.
        with torch._inductor.config.patch(freezing=True):
            return step(model, cache, tok)
    return frozen_step


# A compiled decode's cache room is rounded up to this, so prompts of nearby lengths share one graph.
COMPILED_ROOM = 256


@torch.no_grad()
def generate_ids(model: CausalLM, prompts: list[list[int]], s: Sampling, stop_ids=(EOS, END_OF_TURN),
                 use_cache: bool = True, cache_dtype=None, return_logits: bool = False, should_stop=None,
                 images: torch.Tensor | None = None, audio=None, prefill_chunk: int | None = None,
                 compile: bool = False):
    """The decode loop for any `CausalLM`. `images` go with the prompts' image markers in order, and
    `audio` (a `kosmo.data.audio.Clips` batch) with their audio markers. `prefill_chunk`: with the
    cache, prompts longer than this go in as chunks of it (`prefill`). `compile`: decode steps run as
    one compiled graph over a static cache (`compiled`); the first call per model and shape
    pays for the compilation, and the logits agree with the eager ones to rounding.

    Prompts of different lengths are right-padded and prefilled together; each row of the cache then
    continues from its own length. Returns per-row new token lists (stop token excluded), finish
    reasons and, if asked, the (B, V) logits of every step. `should_stop(row, tokens)` ends a row early.
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("a prompt is empty")
    device = next(model.parameters()).device
    B, width = len(prompts), max(len(p) for p in prompts)
    if width + s.max_new_tokens > model.context_length:
        raise ValueError(f"prompt of {width} tokens + max_new_tokens {s.max_new_tokens} exceeds "
                         f"the context of {model.context_length} tokens")
    max_images = int(max((p.count(IMAGE) for p in prompts), default=0))
    room = width + s.max_new_tokens
    if compile:
        room = COMPILED_ROOM * -(-room // COMPILED_ROOM)
    cache = model.new_cache(B, room, cache_dtype or next(model.parameters()).dtype, device, max_images,
                            static=compile) if use_cache else None
    # greedy decoding over a cache chooses inside the step, so only the tokens come back each step
    greedy = cache is not None and is_greedy(s.temperature) and not return_logits
    decode = decode_greedy if greedy else decode_logits
    if compile and cache is not None:
        decode = compiled(decode, device.type)

    def step(rows: list[list[int]]) -> torch.Tensor:
        """(B, V) logits after each row's last token, the rows right-padded: the prompts into the cache,
        or (without one) the whole sequences so far."""
        idx, lengths = right_pad(rows, device)
        if cache is not None:
            return prefill(model, idx, lengths, cache, images, audio, prefill_chunk)[:, :text_vocab]
        last = torch.arange(idx.shape[1], device=device) == (lengths - 1)[:, None]
        return model(idx, images, audio, cache=cache, n_new=lengths, logits_at=last)[:, :text_vocab]

    def advance(tok: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Feeds tok (B,): the logits after it (None when the greedy step chose without returning them)
        and the next tokens."""
        if cache is None:
            for row, t in zip(fed, tok.tolist()):
                row.append(t)
            logits = step([p + f for p, f in zip(prompts, fed)])
        elif greedy:
            return None, decode(model, cache, tok)
        else:
            logits = decode(model, cache, tok)
        return logits, next_tokens(logits, s, gen)

    text_vocab = model.text_vocab
    gen = torch.Generator(device=device).manual_seed(s.seed) if s.seed is not None else None
    stops = set(stop_ids)
    out: list[list[int]] = [[] for _ in range(B)]
    fed: list[list[int]] = [[] for _ in range(B)]  # without a cache: every token after the prompt, padding included
    reasons = ["length"] * B
    done = [False] * B
    step_logits = []
    logits = step(prompts)
    tok = next_tokens(logits, s, gen)
    with contextlib.ExitStack() as steady:
        for n in range(s.max_new_tokens):
            if return_logits:
                step_logits.append(logits.float())
            for i, t in enumerate(tok.tolist()):  # the one read back to the host a step
                if done[i]:
                    continue
                if t in stops:
                    done[i], reasons[i] = True, "stop"
                    continue
                out[i].append(t)
                if should_stop is not None and should_stop(i, out[i]):
                    done[i], reasons[i] = True, "stop"
            if all(done) or n == s.max_new_tokens - 1:
                break
            if any(done):  # rows already done keep decoding padding so the batch stays rectangular
                tok = tok.masked_fill(torch.tensor(done, device=device), PAD)
            logits, tok = advance(tok)
            if compile and cache is not None and n == 0:
                # The first compiled step checked Dynamo's guards: this model, this cache, these shapes. The
                # rest of the loop feeds the same ones, so checking them again each step (about an eighth
                # of a batch-1 step on a CPU) is skipped.
                steady.enter_context(torch.compiler.set_stance(skip_guard_eval_unsafe=True))
    return (out, reasons, step_logits) if return_logits else (out, reasons)


def generate(model, tokenizer, prompts: list[list[int]], s: Sampling, stop_ids=(EOS, END_OF_TURN),
             cache_dtype=None, images: torch.Tensor | None = None, audio=None,
             compile: bool = False) -> list[Completion]:
    """Completions for a batch of tokenised prompts; stop strings are cut from the returned text."""
    # A stop string of L characters lies within the last L tokens (+3 for a character split into
    # bytes), so each step decodes a short tail instead of the whole completion.
    window = max((len(st) for st in s.stop), default=0) + 4

    def hits_stop(i, toks):
        tail = tokenizer.decode(toks[-window:])
        return any(st in tail for st in s.stop)

    out, reasons = generate_ids(model, prompts, s, stop_ids, cache_dtype=cache_dtype,
                                should_stop=hits_stop if s.stop else None, images=images, audio=audio,
                                compile=compile)
    results = []
    for toks, reason in zip(out, reasons):
        text = tokenizer.decode(toks)
        for st in s.stop:
            if st in text:
                text = text[:text.index(st)]
        results.append(Completion(toks, text, reason))
    return results
