"""The serving engine: continuous batching over a slot KV cache, in one background thread.

Every running request owns a slot: a row of a preallocated KV cache with its own length. A new
request is prefilled alone into a free slot; then, at every decode step, all slots advance by one
token together, and a request that finishes (or whose client went away) frees its slot for the next
one at once. Requests therefore join and leave the running batch at every step.

The engine owns the scheduling and the cache memory; the model owns the maths. Every model kind
(`lm`, `mllm`, `flamingo`) is served by calling its own forward over the cache: prefill through a
one-slot view of it, with the request's images and audio clips, decoding over all slots at once.

A row's numbers never depend on who else is in the batch, so greedy decoding gives each request the
same tokens and log-probabilities whether it runs alone or beside fifteen others. Two things make
that hold: every decode step has the same shape (all `max_batch` rows, idle ones included), because
BLAS picks its kernel, and with it the order of its sums, by the shape of the product; and the
cache's attention masks each row to its own keys, where a masked key adds an exact zero whatever the
other rows hold (see `kosmo.model.cache`). The
engine runs in bf16 autocast with a bf16 cache where `kosmo.hardware` finds native bf16, and in fp32
elsewhere.
"""

from __future__ import annotations

import collections
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kosmo import hardware
from kosmo.data.audio import Clips
from kosmo.generate import Sampling, next_tokens
from kosmo.model.causal_lm import CausalLM
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
    audio: Clips | None = None  # the clips that fill the prompt's <|audio_pad|> runs, in order
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


@dataclass
class _Running:
    request: Request
    stream: TextStream
    generator: torch.Generator
    tokens: int = 0  # generated so far
    last: int = PAD  # the token to feed at the next decode step


class Engine:
    """Continuous batching for one `CausalLM`. `submit` is safe from any thread; the work runs in one
    background thread started by `start`. The engine owns the KV cache, one slot per running request,
    and the model's own forward reads and writes it. In bf16, a model loaded with bf16 weights
    (`load_run(..., precision=...)`) runs fastest: autocast then casts none of them."""

    def __init__(self, model: CausalLM, tokenizer, max_batch: int = 16, max_queue: int = 64,
                 image_mode: str = "crop", precision: str = "auto", max_images: int = 4):
        if not isinstance(model, CausalLM) or model.decoder.lm_head is None:
            raise ValueError(f"serving needs a language model, not a {type(model).__name__}")
        self.model, self.tokenizer, self.max_batch, self.max_queue = model, tokenizer, max_batch, max_queue
        self.max_images = max_images  # per request
        self.device = next(model.parameters()).device
        self.precision = hardware.resolve_precision(precision, self.device)
        self.autocast = self.precision == "bf16"
        dtype = torch.bfloat16 if self.autocast else next(model.parameters()).dtype
        self.cache = model.new_cache(max_batch, model.context_length, dtype, self.device, max_images)
        self.image_mode = image_mode  # how pictures are fitted to the encoder's square, as in training
        self.slots: list[_Running | None] = [None] * max_batch
        self.waiting: collections.deque[Request] = collections.deque()
        self.wake = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False

    @property
    def context(self) -> int:
        return self.model.context_length

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
        if request.images is not None and len(request.images) > self.max_images:
            raise ValueError(f"{len(request.images)} images in the request; the limit is {self.max_images}")
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
                    logits = self._prefill(slot, request.prompt, request.images, request.audio)
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
            logits = self._decode(tokens.to(self.device), active)
        except Exception as e:
            for slot in active:
                self._fail(slot, e)
            return
        for slot in active:
            self._advance(slot, logits[slot])

    @torch.no_grad()
    def _prefill(self, slot: int, ids: list[int], images: torch.Tensor | None, audio: Clips | None) -> torch.Tensor:
        """Runs a prompt (and its pictures and clips, in order) into an emptied slot; the (V,) logits after it."""
        cache = self.cache.rows(slot, slot + 1)
        cache.reset()
        idx = torch.tensor([ids], device=self.device)
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
            logits = self.model(idx, None if images is None else images.to(self.device),
                                None if audio is None else audio.to(self.device), cache=cache, last_only=True)
        return logits[0, -1, :self.model.text_vocab].float()

    @torch.no_grad()
    def _decode(self, tokens: torch.Tensor, active: list[int]) -> torch.Tensor:
        """One token into every slot, (max_batch,) -> (max_batch, V) logits. Idle slots ride along on
        padding, so every step has the same shape (a matmul's order of sums depends on its shape), but
        they neither attend nor grow."""
        n_new = torch.zeros(self.max_batch, dtype=torch.long, device=self.device)
        n_new[active] = 1
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
            logits = self.model(tokens[:, None], cache=self.cache, n_new=n_new, last_only=True)
        return logits[:, -1, :self.model.text_vocab].float()

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
