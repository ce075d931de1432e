"""The serving engine: continuous batching over a slot KV cache, in one background thread.

Every running request owns a slot: a row of a preallocated KV cache with its own length. A new
request is prefilled alone into a free slot; then, at every decode step, all slots advance by one
token together, and a request that finishes (or whose client went away) frees its slot for the next
one at once. Requests therefore join and leave the running batch at every step.

A row's numbers never depend on who else is in the batch, so greedy decoding gives each request the
same tokens whether it runs alone or beside fifteen others. Two things make that hold:
- every decode step has the same shape (all `max_batch` rows, idle ones included), because BLAS picks
  its kernel, and with it the order of its sums, by the shape of the product;
- attention runs row by row over exactly that row's keys, since a batched, masked attention sums
  in an order that depends on the batch and on the longest row.

The model side is an `Adapter` with `prefill(slot, ids, images)` and `decode(tokens, active)`, one
per architecture in `ADAPTERS`: the plain decoder serves `lm` and `mllm` runs, and `flamingo` runs
add each slot's visual tokens, which the gated cross-attention reads at every step. The engine runs in
bf16 autocast with a bf16 cache where `kosmo.hardware` finds native bf16, and in fp32 elsewhere.
"""

from __future__ import annotations

import collections
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from kosmo import hardware
from kosmo.generate import Sampling, next_tokens
from kosmo.model.lm import LM, apply_rope
from kosmo.tokenizer import END_OF_TURN, EOS, PAD

STOP_IDS = (EOS, END_OF_TURN)


class QueueFull(Exception):
    """More requests are waiting than the engine was told to hold."""


@dataclass
class Params:
    """What one request asks for."""
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: no log-probabilities; k: the chosen token's and the k likeliest


@dataclass
class Event:
    """One generated token, as the client sees it."""
    token: int
    text: str  # the text this token releases ("" while a character or a possible stop string is incomplete)
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)
    finish: str | None = None  # "stop" or "length" on the last event


@dataclass
class Request:
    prompt: list[int]
    params: Params
    emit: Callable[[Event | Exception], None]  # called from the engine thread
    images: torch.Tensor | None = None
    cancelled: bool = False  # set by the client's side; the engine frees the slot at its next step

    def cancel(self):
        self.cancelled = True


class TextStream:
    """Turns tokens into text deltas: holds back a half-decoded character and any tail that could
    still grow into a stop string, and cuts the text at the first stop string."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.tokens: list[int] = []
        self.sent = 0  # characters of the text already released

    def push(self, token: int) -> tuple[str, bool]:
        """(newly releasable text, whether a stop string was reached)."""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        horizon = max(0, self.sent - max((len(s) for s in self.stop), default=0))
        hits = [i for i in (text.find(s, horizon) for s in self.stop) if i >= 0]
        if hits:
            return self._release(text, min(hits)), True
        end = len(text)
        if text.endswith("\ufffd"):  # a character split across tokens: wait for its other bytes
            end -= 1
        for s in self.stop:
            end = min(end, len(text) - _overlap(text, s))
        return self._release(text, end), False

    def flush(self) -> str:
        return self._release(self.tokenizer.decode(self.tokens), None)

    def _release(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else max(end, self.sent)
        out, self.sent = text[self.sent:end], end
        return out


def _overlap(text: str, stop: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `stop`."""
    for n in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


class Adapter(Protocol):
    """What the engine needs from a model architecture; each keeps its own per-slot state (KV cache, ...)."""
    context: int  # tokens a slot holds, prompt included
    tokens_per_image: int  # image slots per picture in the prompt (0: text-only)
    image_size: int  # side of the square pictures the encoder takes

    def prefill(self, slot: int, ids: list[int], images: torch.Tensor | None) -> torch.Tensor:
        """Starts `slot` on a prompt (its pictures in order); the (V,) logits after its last token."""

    def decode(self, tokens: torch.Tensor, active: list[int]) -> torch.Tensor:
        """Feeds one token to every slot, (max_batch,) -> (max_batch, V) logits; only `active` slots matter."""


class DecoderAdapter:
    """A Llama decoder (`lm`) or a KOSMOS MLLM (`mllm`), over a slot KV cache.

    Images of a KOSMOS model are embeddings in the prompt, so they matter at prefill only; the
    decode step is the plain LM's.
    """

    def __init__(self, model, max_batch: int, device: torch.device, precision: str = "auto"):
        self.model = model
        self.lm: LM = getattr(model, "lm", model)
        cfg = self.lm.cfg
        self.context = cfg.max_seq_len
        self.tokens_per_image = model.cfg.tokens_per_image if hasattr(model, "embed_inputs") else 0
        self.image_size = model.cfg.vision.image_size if self.tokens_per_image else 0
        self.autocast = hardware.resolve_precision(precision, device) == "bf16"
        dtype = torch.bfloat16 if self.autocast else next(self.lm.parameters()).dtype
        shape = (cfg.n_layers, max_batch, cfg.n_kv_heads, cfg.max_seq_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # with smeared keys, each slot's unblended key of its last position, per layer
        self.last_k = torch.zeros(shape[:3] + (1, shape[4]), dtype=dtype, device=device) if cfg.smear_keys else None
        self.lengths = [0] * max_batch
        self.device = device

    @torch.no_grad()
    def prefill(self, slot: int, ids: list[int], images: torch.Tensor | None) -> torch.Tensor:
        """Runs the prompt into `slot`; the (V,) logits of its last position."""
        idx = torch.tensor([ids], device=self.device)
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
            x = self.lm.embed(idx) if images is None else self.model.embed_inputs(idx, images.to(self.device))
            pos = torch.arange(len(ids), device=self.device)[None]
            self.lengths[slot] = 0
            return self._forward(x, pos, [slot], decode=False)[0, -1].float()

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, active: list[int]) -> torch.Tensor:
        """One step for every slot: (max_batch,) next-input tokens -> (max_batch, V) logits.

        Idle slots ride along on padding so the step's shape never changes; only `active` rows
        attend and write to the cache.
        """
        pos = torch.tensor([self.lengths[s] if s in active else 0 for s in range(len(self.lengths))],
                           device=self.device)[:, None]
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
            return self._forward(self.embed_tokens(tokens[:, None]), pos, active, decode=True)[:, -1].float()

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm.embed(tokens)

    def _forward(self, x, pos, rows: list[int], decode: bool):
        """The LM over `x` (B, T, dim) at positions `pos` (B, T): a decode step over every slot, of which
        `rows` are active, or a prompt (B == 1) for slot `rows[0]`."""
        rope, _ = self.lm.context(x, pos)  # attention below reads each slot's own keys only: no mask
        for layer, block in enumerate(self.lm.blocks):
            x = self._before_block(layer, x, rows, decode)
            x = x + self._attention(block.attn, block.attn_norm(x), *rope, layer, rows, decode)
            x = x + block.mlp(block.mlp_norm(x))
        for r in rows:
            self.lengths[r] += x.shape[1]
        return self.lm.head(x, last_only=True)

    def _before_block(self, layer: int, x, rows: list[int], decode: bool):
        return x

    def _attention(self, attn, x, cos, sin, layer: int, rows: list[int], decode: bool):
        B, T, _ = x.shape
        hq, hkv, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
        q, k, v = attn.qkv(x).split([hq * d, hkv * d, hkv * d], dim=-1)
        q = apply_rope(q.view(B, T, hq, d).transpose(1, 2), cos, sin)
        k = k.view(B, T, hkv, d).transpose(1, 2)
        if attn.smear is not None:
            k = self._smeared(attn, k, layer, rows, decode)
        k = apply_rope(k, cos, sin)
        v = v.view(B, T, hkv, d).transpose(1, 2)
        if not decode:  # prefill: the prompt fills its slot from the start
            self.k[layer, rows[0], :, :T] = k[0]
            self.v[layer, rows[0], :, :T] = v[0]
            keys, values = self.k[layer, rows[0]:rows[0] + 1, :, :T], self.v[layer, rows[0]:rows[0] + 1, :, :T]
            y = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), is_causal=T > 1,
                                               enable_gqa=hq != hkv)
            return attn.proj(y.transpose(1, 2).reshape(B, T, hq * d))
        # decode: every active slot writes its one new key at its own length, in one indexed copy
        slots = torch.tensor(rows, device=x.device)
        at = torch.tensor([self.lengths[r] for r in rows], device=x.device)
        self.k[layer, slots, :, at] = k[slots, :, 0].to(self.k.dtype)
        self.v[layer, slots, :, at] = v[slots, :, 0].to(self.v.dtype)
        # then attends over exactly its own keys, the query heads of a kv group folded into the query axis
        y = torch.zeros_like(q)
        for r in rows:
            n = self.lengths[r] + 1
            keys, values = self.k[layer, r:r + 1, :, :n].to(q.dtype), self.v[layer, r:r + 1, :, :n].to(q.dtype)
            y[r] = F.scaled_dot_product_attention(q[r].view(1, hkv, hq // hkv, d), keys, values).view(hq, 1, d)
        return attn.proj(y.transpose(1, 2).reshape(B, T, hq * d))

    def _smeared(self, attn, k, layer: int, rows: list[int], decode: bool):
        """The LM's smeared keys: a prompt starts its slot afresh, a decode step continues each slot's last key."""
        T = k.shape[2]
        before = self.last_k[layer] if decode else k.new_zeros(1, attn.n_kv_heads, 1, attn.head_dim)
        follows = torch.ones(1, 1, T, 1, dtype=torch.bool, device=k.device)
        follows[:, :, 0] = decode
        out = attn.smeared(k, before, follows)
        slots = torch.tensor(rows, device=k.device) if decode else rows[0]
        self.last_k[layer, slots] = (k[slots] if decode else k[0])[..., -1:, :].to(self.last_k.dtype)
        return out


class FlamingoAdapter(DecoderAdapter):
    """A Flamingo model: the frozen LM's slot cache, plus each slot's visual tokens, which its gated
    cross-attention blocks read at every step. Images are marked by `<image></image>` in the prompt.

    A decode step's cross-attention runs row by row, so, like the self-attention, a row's numbers
    never depend on the other slots.
    """

    def __init__(self, model, max_batch: int, device: torch.device, precision: str = "auto"):
        super().__init__(model, max_batch, device, precision)
        self.image_size = model.cfg.vision.image_size
        self.media: list[tuple | None] = [None] * max_batch  # per slot: (visual tokens, image index of each)
        self.prompt_media = None  # (media, visible, sees_media) of the prompt being prefilled

    @torch.no_grad()
    def prefill(self, slot: int, ids: list[int], images: torch.Tensor | None) -> torch.Tensor:
        idx = torch.tensor([ids], device=self.device)
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
            cache = self.model.new_cache(1, 1, device=self.device)  # holds the media only; keys live in the slots
            self.prompt_media = self.model.media_for(idx, None if images is None else images.to(self.device), cache)
            self.media[slot] = None if cache.media is None else (cache.media, cache.media_image)
            pos = torch.arange(len(ids), device=self.device)[None]
            self.lengths[slot] = 0
            x = self.model.embed(idx)
            return self._forward(x, pos, [slot], decode=False)[0, -1].float()

    def _before_block(self, layer: int, x, rows: list[int], decode: bool):
        block = self.model.xattn[str(layer)] if str(layer) in self.model.xattn else None
        if block is None:
            return x
        if not decode:
            return x if self.prompt_media is None else block(x, *self.prompt_media)
        out = x.clone()
        for r in rows:
            if self.media[r] is None:
                continue
            media, image = self.media[r]
            # a generated token belongs to the slot's last image (an <image> it writes opens no new one)
            latest = image.max()
            visible = image == latest if self.model.cfg.attend == "latest" else image >= 0
            out[r:r + 1] = block(x[r:r + 1], media, visible[:, None, None, :],
                                 torch.ones(1, 1, dtype=torch.bool, device=x.device))
        return out

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.embed(tokens)


ADAPTERS: dict[str, type[Adapter]] = {"lm": DecoderAdapter, "mllm": DecoderAdapter, "flamingo": FlamingoAdapter}


@dataclass
class _Running:
    request: Request
    stream: TextStream
    generator: torch.Generator
    tokens: int = 0  # generated so far
    last: int = PAD  # the token to feed at the next decode step


class Engine:
    """Continuous batching for one model. `submit` is safe from any thread; the work runs in one
    background thread started by `start`. In bf16, a model loaded with bf16 weights
    (`load_run(..., precision=...)`) runs fastest: autocast then casts none of them."""

    def __init__(self, model, tokenizer, arch: str, max_batch: int = 16, max_queue: int = 64,
                 image_mode: str = "crop", precision: str = "auto"):
        if arch not in ADAPTERS:
            raise ValueError(f"serving does not support arch {arch!r} (supported: {', '.join(ADAPTERS)})")
        self.device = next(model.parameters()).device
        self.precision = hardware.resolve_precision(precision, self.device)
        self.adapter: Adapter = ADAPTERS[arch](model, max_batch, self.device, self.precision)
        self.tokenizer, self.max_batch, self.max_queue = tokenizer, max_batch, max_queue
        self.image_mode = image_mode  # how pictures are fitted to the encoder's square, as in training
        self.slots: list[_Running | None] = [None] * max_batch
        self.waiting: collections.deque[Request] = collections.deque()
        self.wake = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False

    @property
    def context(self) -> int:
        return self.adapter.context

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    @property
    def running(self) -> int:
        return sum(s is not None for s in self.slots)

    def start(self) -> "Engine":
        self.thread = threading.Thread(target=self._loop, name="kosmo-engine", daemon=True)
        self.thread.start()
        return self

    def stop(self):
        with self.wake:
            self.stopping = True
            self.wake.notify()
        if self.thread is not None:
            self.thread.join()

    def submit(self, request: Request):
        if len(request.prompt) + request.params.max_tokens > self.context:
            raise ValueError(f"{len(request.prompt)} prompt tokens + {request.params.max_tokens} new tokens "
                             f"exceed the context of {self.context}")
        with self.wake:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the server is busy: {len(self.waiting)} requests are waiting")
            self.waiting.append(request)
            self.wake.notify()

    def _loop(self):
        while True:
            with self.wake:
                while not self.stopping and not self.waiting and not self.running:
                    self.wake.wait()
                if self.stopping:
                    return
            self._admit()
            self._drop_cancelled()
            if self.running:
                self._step()

    def _admit(self):
        """Prefills waiting requests into free slots; each gets its first token right away."""
        for slot in range(self.max_batch):
            while self.slots[slot] is None:
                with self.wake:
                    if not self.waiting:
                        return
                    request = self.waiting.popleft()
                if request.cancelled:
                    continue
                seed = request.params.seed if request.params.seed is not None else random.getrandbits(64)
                self.slots[slot] = _Running(request, TextStream(self.tokenizer, request.params.stop),
                                            torch.Generator(device=self.device).manual_seed(seed % 2**64))
                try:
                    logits = self.adapter.prefill(slot, request.prompt, request.images)
                    self._advance(slot, logits)
                except Exception as e:  # a bad request must not take the others down
                    self._fail(slot, e)

    def _drop_cancelled(self):
        for slot, run in enumerate(self.slots):
            if run is not None and run.request.cancelled:
                self.slots[slot] = None

    def _step(self):
        active = [slot for slot, run in enumerate(self.slots) if run is not None]
        tokens = torch.full((self.max_batch,), PAD, dtype=torch.long)
        for slot in active:
            tokens[slot] = self.slots[slot].last
        try:
            logits = self.adapter.decode(tokens.to(self.device), active)
        except Exception as e:
            for slot in active:
                self._fail(slot, e)
            return
        for slot in active:
            self._advance(slot, logits[slot])

    def _advance(self, slot: int, logits: torch.Tensor):
        """Samples the next token of `slot` from its (V,) logits and tells the client."""
        run = self.slots[slot]
        p = run.request.params
        s = Sampling(temperature=p.temperature, top_p=p.top_p)
        token = int(next_tokens(logits[None], s, run.generator)[0])
        event = Event(token, "")
        if p.logprobs is not None:
            logprobs = logits.log_softmax(-1)
            event.logprob = float(logprobs[token])
            if p.logprobs:
                top = logprobs.topk(p.logprobs)
                event.top = list(zip(top.indices.tolist(), top.values.tolist()))
        run.tokens += 1
        if token in STOP_IDS:
            event.text, event.finish = run.stream.flush(), "stop"
        else:
            event.text, hit_stop = run.stream.push(token)
            if hit_stop:
                event.finish = "stop"
            elif run.tokens >= p.max_tokens:
                event.text += run.stream.flush()
                event.finish = "length"
        run.last = token
        if event.finish:
            self.slots[slot] = None
        self._tell(run.request, event)

    def _fail(self, slot: int, error: Exception):
        run, self.slots[slot] = self.slots[slot], None
        self._tell(run.request, error)

    @staticmethod
    def _tell(request: Request, message: Event | Exception):
        try:
            request.emit(message)
        except Exception:  # the listener is gone (e.g. its event loop closed): stop working for it
            request.cancel()
