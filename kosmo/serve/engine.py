"""The serving engine: continuous batching over a slot KV cache, in one background thread.

Every running request owns a slot: a row of a preallocated KV cache with its own length. A new
request is prefilled alone into a free slot; then, at every decode step, all slots advance by one
token together, and a request that finishes (or whose client went away) frees its slot for the next
one at once. Requests therefore join and leave the running batch at every step.

The engine owns the scheduling and the cache memory; the model owns the maths. Every model kind
(`lm`, `mllm`, `flamingo`) is served by calling its own forward over the cache: prefill through a
one-slot view of it, with the request's images and audio clips, decoding over all slots at once.

With `batch_shapes="full"` (the default), a row's numbers never depend on who else is in the batch, so
greedy decoding gives each request the same tokens and log-probabilities, to the bit, whether it runs
alone or beside fifteen others. Two things make that hold: every decode step has the same shape (all
`max_batch` rows, idle ones included), because BLAS picks its kernel, and with it the order of its sums,
by the shape of the product; and the cache's attention masks each row to its own keys, where a masked
key adds an exact zero whatever the other rows hold (see `kosmo.model.cache`). The price is that a lone
request pays for `max_batch` rows at every step. With `batch_shapes="bucketed"` a step runs only the
slots up to the last busy one, rounded up to a power of two (1, 2, 4, 8, ...; a request takes the lowest
free slot), so a lone request decodes about as fast as one served alone; a row's numbers then depend on
the step's bucket, which depends on the other requests, so log-probabilities can differ in their last
bits with the batch's make-up, and a greedy token where two candidates tie that closely.

Text prompts share a prefix cache (`kosmo.serve.prefix_cache`, `prefix_cache_tokens`; 0 turns it off):
a prompt that begins with blocks of 64 tokens an earlier prompt computed copies their keys and values
instead of computing them again. With it on, every text prompt is prefilled one block per forward, so a
block's numbers are the same whether the blocks before it were copied or computed: a request gets the
same bits whether its prefix was cached or not. Turning the cache off prefills a prompt in one forward
(or `prefill_chunk`s), whose numbers agree with the blockwise ones to rounding, as chunked prefill's do
(tests/test_chunked.py), not to the bit. Prompts with images or audio neither use nor fill the cache.

The engine runs in bf16 autocast with a bf16 cache where `kosmo.hardware` finds native bf16, and in fp32
elsewhere.

Drawing requests (`Request.draw`) share the batch. A guided picture owns two slots, its prompt's and the
unconditional prompt's (`kosmo.draw.UNCONDITIONAL`), and is admitted only when both are free (requests are
admitted in the order they came, so those behind it wait for it rather than overtake it); at every step
`kosmo.draw` mixes the pair's code logits and samples one code, which both slots are fed next, and after
grid x grid codes the image tokenizer decodes the picture and both slots are freed. The maths is
`kosmo.draw`'s (`guide`, `sample_codes`), so a picture drawn here has the codes `kosmo.draw.draw_codes` gives
its prompt alone: the same at temperature 0, and the same when sampling from the same seed (each picture
draws from its own generator, as there), as far as the two paths' logits round alike. Text sees only the
text vocabulary's logits: the engine computes them all, and a text row is cut to `model.text_vocab` where it
is sampled.
"""

from __future__ import annotations

import collections
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image

from kosmo import hardware
from kosmo.data.audio import Clips
from kosmo.draw import UNCONDITIONAL, DrawSampling, check_can_draw, guide, pictures, sample_codes
from kosmo.generate import Sampling, next_tokens, prefill
from kosmo.model.cache import KVCache
from kosmo.model.causal_lm import CausalLM
from kosmo.serve.prefix_cache import PrefixCache
from kosmo.tokenizer import END_OF_TURN, EOS, PAD

STOP_IDS = (EOS, END_OF_TURN)
PREFIX_BLOCK = 64  # tokens per prefix-cache block, as the cache's key spans (`kosmo.model.cache.key_span`)
# "full": every decode step runs all max_batch rows; "bucketed": the rows up to the last busy one, rounded
# up to a power of two (see the module's docstring for what each keeps)
BATCH_SHAPES = ("full", "bucketed")


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
class Picture:
    """A finished drawing, as the client sees it."""
    image: Image.Image  # the image tokenizer's size
    codes: torch.Tensor  # (grid, grid)


@dataclass
class Request:
    prompt: list[int]  # a drawing's ends in <|begin_of_image|> (`kosmo.draw.prompt_ids`)
    params: Params | None  # text's; None for a drawing
    emit: Callable[[Event | Picture | Exception], None]  # called from the engine thread
    images: torch.Tensor | None = None
    audio: Clips | None = None  # the clips that fill the prompt's <|audio_pad|> runs, in order
    draw: DrawSampling | None = None  # a picture instead of text: one Picture event at its end
    cancelled: bool = False  # set by the client's side; the engine frees the slot at its next step

    def cancel(self):
        self.cancelled = True

    @property
    def slots(self) -> int:
        """How many slots it runs in: a guided picture's unconditional twin takes a second one."""
        return 2 if self.draw is not None and self.draw.cfg != 1 else 1


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


def seeded(seed: int | None, device: torch.device) -> torch.Generator:
    """A request's own random stream: from its seed, or from a fresh one."""
    seed = seed if seed is not None else random.getrandbits(64)
    return torch.Generator(device=device).manual_seed(seed % 2**64)


def sample_event(logits: torch.Tensor, p: Params, stream: TextStream, generator: torch.Generator,
                 count: int) -> Event:
    """The `count`-th token of a text request, sampled from its (text vocabulary,) logits, as the client sees it."""
    token = int(next_tokens(logits[None], Sampling(temperature=p.temperature, top_p=p.top_p), generator)[0])
    event = Event(token, "")
    if p.logprobs is not None:
        logprobs = logits.log_softmax(-1)
        event.logprob = float(logprobs[token])
        if p.logprobs:
            top = logprobs.topk(p.logprobs)
            event.top = list(zip(top.indices.tolist(), top.values.tolist()))
    if token in STOP_IDS:
        event.text, event.finish = stream.flush(), "stop"
    else:
        event.text, hit_stop = stream.push(token)
        if hit_stop:
            event.finish = "stop"
        elif count >= p.max_tokens:
            event.text += stream.flush()
            event.finish = "length"
    return event


@dataclass
class _Running:
    request: Request
    stream: TextStream
    generator: torch.Generator
    tokens: int = 0  # generated so far
    last: int = PAD  # the token to feed at the next decode step


@dataclass
class _Drawing:
    request: Request
    generator: torch.Generator
    slots: list[int]  # the prompt's, then (guided) the unconditional twin's
    codes: list[int] = field(default_factory=list)
    last: int = PAD  # the code's id to feed both slots at the next decode step


class Engine:
    """Continuous batching for one `CausalLM`. `submit` is safe from any thread; the work runs in one
    background thread started by `start`. The engine owns the KV cache, one slot per running request,
    and the model's own forward reads and writes it. In bf16, a model loaded with bf16 weights
    (`load_run(..., precision=...)`) runs fastest: autocast then casts none of them."""

    def __init__(self, model: CausalLM, tokenizer, max_batch: int = 16, max_queue: int = 64,
                 image_mode: str = "crop", precision: str = "auto", max_images: int = 4,
                 prefill_chunk: int | None = None, prefix_cache_tokens: int = 8192, batch_shapes: str = "full"):
        if not isinstance(model, CausalLM) or model.decoder.lm_head is None:
            raise ValueError(f"serving needs a language model, not a {type(model).__name__}")
        if batch_shapes not in BATCH_SHAPES:
            raise ValueError(f"batch_shapes must be one of {', '.join(BATCH_SHAPES)}, not {batch_shapes!r}")
        if 0 < prefix_cache_tokens < PREFIX_BLOCK or prefix_cache_tokens < 0:
            raise ValueError(f"the prefix cache holds blocks of {PREFIX_BLOCK} tokens: give it 0 (off) or at least "
                             f"{PREFIX_BLOCK} tokens, not {prefix_cache_tokens}")
        self.model, self.tokenizer, self.max_batch, self.max_queue = model, tokenizer, max_batch, max_queue
        self.max_images = max_images  # per request
        self.prefill_chunk = prefill_chunk  # a longer prompt goes in as chunks of this many tokens (`generate.prefill`)
        self.device = next(model.parameters()).device
        self.precision = hardware.resolve_precision(precision, self.device)
        self.autocast = self.precision == "bf16"
        dtype = torch.bfloat16 if self.autocast else next(model.parameters()).dtype
        self.cache = model.new_cache(max_batch, model.context_length, dtype, self.device, max_images)
        self.prefix = PrefixCache(self.cache, prefix_cache_tokens, PREFIX_BLOCK) if prefix_cache_tokens else None
        self.batch_shapes = batch_shapes
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
        """Requests running (a guided picture holds two slots)."""
        return len({id(s) for s in self.slots if s is not None})

    @property
    def free_slots(self) -> int:
        """Slots no request holds: `max_batch` again once every request has finished or been cancelled."""
        return sum(run is None for run in self.slots)

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
        if request.draw is not None:
            check_can_draw(self.model)
            n_codes = self.model.image_tokenizer.grid ** 2
            if len(request.prompt) + n_codes > self.context:
                raise ValueError(f"{len(request.prompt)} prompt tokens + {n_codes} codes exceed the context of "
                                 f"{self.context}")
            if request.slots > self.max_batch:
                raise ValueError(f"a guided picture needs 2 slots; this engine has {self.max_batch}")
        elif len(request.prompt) + request.params.max_tokens > self.context:
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
        """Prefills waiting requests, in order, into free slots; each gets its first token (or code) right
        away. A guided picture waits at the head of the queue until two slots are free at once."""
        while True:
            free = [slot for slot, run in enumerate(self.slots) if run is None]
            with self.wake:
                if not self.waiting or not free:
                    return
                request = self.waiting[0]
                if not request.cancelled and request.slots > len(free):
                    return
                self.waiting.popleft()
            if request.cancelled:
                continue
            if request.draw is not None:
                self._start_drawing(request, free[:request.slots])
                continue
            slot = free[0]
            self.slots[slot] = _Running(request, TextStream(self.tokenizer, request.params.stop),
                                        self._generator(request.params.seed))
            try:
                logits = self._prefill(slot, request.prompt, request.images, request.audio)
                self._advance(slot, logits)
            except Exception as e:  # a bad request must not take the others down
                self._fail(slot, e)

    def _generator(self, seed: int | None) -> torch.Generator:
        return seeded(seed, self.device)

    def _start_drawing(self, request: Request, slots: list[int]):
        run = _Drawing(request, self._generator(request.draw.seed), slots)
        for slot in slots:
            self.slots[slot] = run
        try:
            prompts = [request.prompt, UNCONDITIONAL][:len(slots)]
            logits = torch.stack([self._prefill(slot, ids, None, None) for slot, ids in zip(slots, prompts)])
            self._advance_drawing(run, logits)
        except Exception as e:
            self._fail(slots[0], e)

    def _drop_cancelled(self):
        for slot, run in enumerate(self.slots):
            if run is not None and run.request.cancelled:
                self.slots[slot] = None

    def _step(self):
        active = [slot for slot, run in enumerate(self.slots) if run is not None]
        rows = self.max_batch if self.batch_shapes == "full" else min(self.max_batch, bucket(active[-1] + 1))
        tokens = torch.full((rows,), PAD, dtype=torch.long)
        for slot in active:
            tokens[slot] = self.slots[slot].last
        try:
            logits = self._decode(tokens.to(self.device), active)
        except Exception as e:
            for slot in active:
                if self.slots[slot] is not None:
                    self._fail(slot, e)
            return
        for slot in active:
            run = self.slots[slot]
            if isinstance(run, _Drawing):
                if slot == run.slots[0]:  # a pair advances once, on both its rows
                    self._advance_drawing(run, logits[run.slots])
            elif run is not None:
                self._advance(slot, logits[slot])

    @torch.no_grad()
    def _prefill(self, slot: int, ids: list[int], images: torch.Tensor | None, audio: Clips | None) -> torch.Tensor:
        """Runs a prompt (and its pictures and clips, in order) into an emptied slot; the (V,) logits after it."""
        cache = self.cache.rows(slot, slot + 1)
        if self.prefix is not None and images is None and audio is None:
            return self._prefill_blocks(cache, ids)
        cache.reset()
        idx = torch.tensor([ids], device=self.device)
        images = None if images is None else images.to(self.device)
        audio = None if audio is None else audio.to(self.device)
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
            if self.prefill_chunk and len(ids) > self.prefill_chunk:
                lengths = torch.tensor([len(ids)], device=self.device)
                return prefill(self.model, idx, lengths, cache, images, audio, self.prefill_chunk)[0].float()
            logits = self.model(idx, images, audio, cache=cache, last_only=True)
        return logits[0, -1].float()

    def _prefill_blocks(self, cache: KVCache, ids: list[int]) -> torch.Tensor:
        """Prefills a text prompt into the one-row `cache` through the prefix cache: the longest run of
        cached blocks it begins with is copied in, and the rest goes in one block per forward, each new
        whole block kept for later prompts, as far as the pool could hold a prompt's blocks; after that,
        in `prefill_chunk`s. The forwards' spans are the same whether or not the blocks before them were
        cached, so the keys, and the logits, have the same bits either way."""
        chain = self.prefix.match(ids)
        self.prefix.load(cache, chain)
        block = self.prefix.block
        blockwise = min(len(ids), self.prefix.capacity * block)
        starts = [*range(len(chain) * block, blockwise, block),
                  *range(blockwise, len(ids), self.prefill_chunk or len(ids))]
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
            for start, stop in zip(starts, starts[1:] + [len(ids)]):
                idx = torch.tensor([ids[start:stop]], device=self.device)
                if stop == len(ids):
                    logits = self.model(idx, cache=cache, last_only=True)[0, -1]
                else:  # no logits wanted: only the keys and values
                    self.model(idx, cache=cache, logits_at=torch.zeros_like(idx, dtype=torch.bool))
                if stop <= blockwise and stop - start == block:
                    chain.append(self.prefix.add(cache, chain[-1] if chain else None, tuple(ids[start:stop])))
        self.prefix.touch(chain)
        return logits.float()

    @torch.no_grad()
    def _decode(self, tokens: torch.Tensor, active: list[int]) -> torch.Tensor:
        """One token into each of the first R slots, (R,) -> (R, V) logits (the whole vocabulary: text rows are
        cut to the text's in `_advance`, pictures' to the codes' in `kosmo.draw.guide`). R is max_batch, or a
        bucket with `batch_shapes="bucketed"`. Idle slots among them ride along on padding, so that the step
        has that shape (a matmul's order of sums depends on its shape), but they neither attend nor grow."""
        rows = tokens.shape[0]
        n_new = torch.zeros(rows, dtype=torch.long, device=self.device)
        n_new[active] = 1
        cache = self.cache if rows == self.max_batch else self.cache.rows(0, rows)
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocast):
            logits = self.model(tokens[:, None], cache=cache, n_new=n_new, last_only=True)
        return logits[:, -1].float()

    def _advance(self, slot: int, logits: torch.Tensor):
        """Samples the next token of `slot` from its (V,) logits, of which text sees its own, and tells the
        client."""
        run = self.slots[slot]
        run.tokens += 1
        event = sample_event(logits[:self.model.text_vocab], run.request.params, run.stream, run.generator,
                             run.tokens)
        run.last = event.token
        if event.finish:
            self.slots[slot] = None
        self._tell(run.request, event)

    def _advance_drawing(self, run: _Drawing, logits: torch.Tensor):
        """Samples a picture's next code from its rows' (1 or 2, V) logits; the last one ends the picture."""
        s = run.request.draw
        code = sample_codes(guide(self.model, logits, s.cfg), s, [run.generator])
        run.codes.append(int(code[0]))
        run.last = int(self.model.codes_to_ids(code)[0])
        grid = self.model.image_tokenizer.grid
        if len(run.codes) < grid ** 2:
            return
        for slot in run.slots:
            self.slots[slot] = None
        codes = torch.tensor(run.codes, device=self.device).view(1, grid, grid)
        try:
            image = pictures(self.model, codes)[0]  # as `kosmo.draw` decodes, outside autocast
        except Exception as e:
            self._tell(run.request, e)
            return
        self._tell(run.request, Picture(image, codes[0].cpu()))

    def _fail(self, slot: int, error: Exception):
        run = self.slots[slot]
        if run is None:  # a picture whose pair was already freed
            return
        for i in run.slots if isinstance(run, _Drawing) else [slot]:
            self.slots[i] = None
        self._tell(run.request, error)

    @staticmethod
    def _tell(request: Request, message: Event | Exception):
        try:
            request.emit(message)
        except Exception:  # the listener is gone (e.g. its event loop closed): stop working for it
            request.cancel()


def bucket(n: int) -> int:
    """The decode rows of a bucketed step whose last busy slot is n - 1: n rounded up to a power of two, so
    that a step takes one of a few shapes."""
    return 1 << (n - 1).bit_length()
