"""The language-modelling stage: packed next-token prediction on text from any kosmo data source.

A folder of parquet shards as the only --data is streamed (`kosmo.data.stream`), for corpora larger than
memory; anything else is read and packed in memory.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kosmo.data.copying import repeated_spans
from kosmo.data.formats import parse_source
from kosmo.data.jsonl import iter_texts
from kosmo.data.passkey import PasskeyPrompts, passkey_row
from kosmo.data.stream import TextStream
from kosmo.errors import KosmoError
from kosmo.model import lora
from kosmo.model.causal_lm import LOSS_CHUNK
from kosmo.model.lm import LM, SIZES, LMConfig, rope_tables
from kosmo.tokenizer import BOS, EOS, Tokenizer
from kosmo.train import distributed as D
from kosmo.train.trainer import TrainConfig


@dataclass
class StageConfig(lora.LoRAStage):
    model: dict = field(default_factory=lambda: {"size": "tiny"})  # a named size plus LMConfig fields
    train: TrainConfig = field(default_factory=TrainConfig)
    seq_len: int = 256
    val_fraction: float = 0.02   # share of packed rows held out for eval loss (in-memory data)
    val_data: str = ""           # held-out data for eval loss when --data is a streamed shard folder
    vocab_size: int = 4096       # when the stage trains its own tokenizer
    copy_rows: float = 0.0       # share of every batch given to repeated spans (copy_rows), 0 to 1
    passkey_rows: float = 0.0    # share of every batch given to passkey prompts (passkey_rows), 0 to 1

    def __post_init__(self):
        super().__post_init__()
        for name in ("copy_rows", "passkey_rows"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be between 0 and 1, got {getattr(self, name)}")
        if self.copy_rows + self.passkey_rows > 1:
            raise ValueError(f"copy_rows + passkey_rows must be at most 1, got {self.copy_rows + self.passkey_rows}")


def lm_config(model: dict, vocab_size: int) -> LMConfig:
    """LMConfig from {"size": name, **field overrides}, with the tokenizer's vocabulary."""
    model = dict(model)
    size = model.pop("size", "tiny")
    if size not in SIZES:
        raise KosmoError(f"unknown config value model.size={size!r} (known: {', '.join(SIZES)})")
    known = set(LMConfig.__dataclass_fields__)
    for key in model:
        if key not in known:
            raise KosmoError(f"unknown config key 'model.{key}' (known: size, {', '.join(sorted(known))})")
    try:
        return LMConfig(**{**SIZES[size], "vocab_size": vocab_size, **model})
    except (TypeError, ValueError) as e:
        raise KosmoError(f"invalid model config: {e}") from None


CONTEXT_KEYS = ("max_seq_len", "rope_theta", "rope_scaling")


def with_context(model: LM, overrides: dict) -> LM:
    """The --init model with the RoPE and length fields of `model.*` overrides (max_seq_len, rope_theta,
    rope_scaling) applied: how a model trained short is fine-tuned at length. The weights are kept; only
    the config and the RoPE tables change. Other `model.*` keys describe the architecture and are not read."""
    changes = {k: overrides[k] for k in CONTEXT_KEYS if k in overrides}
    if not changes:
        return model
    try:
        model.cfg = dataclasses.replace(model.cfg, **changes)
        cos, sin = rope_tables(model.cfg.head_dim, model.cfg.max_seq_len, model.cfg.rope_theta, model.cfg.rope_scaling)
    except (TypeError, ValueError) as e:
        raise KosmoError(f"invalid model config: {e}") from None
    model.rope_cos, model.rope_sin = cos.to(model.rope_cos), sin.to(model.rope_sin)
    return model


class PackedText:
    """Documents joined as <s> doc </s> <s> doc </s> … and cut into rows of seq_len + 1 tokens."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    @classmethod
    def from_texts(cls, texts, tokenizer: Tokenizer, seq_len: int, batch_docs: int = 1024) -> "PackedText":
        stream: list[int] = []
        buf: list[str] = []
        for text in texts:
            buf.append(text)
            if len(buf) == batch_docs:
                stream += _join(tokenizer.encode_batch(buf))
                buf = []
        stream += _join(tokenizer.encode_batch(buf)) if buf else []
        n = (len(stream) - 1) // seq_len
        if n < 1:
            raise KosmoError(f"the data holds {len(stream)} tokens, fewer than one row of seq_len={seq_len}")
        t = torch.tensor(stream[: n * seq_len + 1], dtype=torch.long)
        # rows overlap by one token so that every token but the very first is a target exactly once
        return cls(t.unfold(0, seq_len + 1, seq_len).contiguous())

    def split(self, val_fraction: float) -> tuple["PackedText", "PackedText | None"]:
        n_val = int(len(self.rows) * val_fraction)
        if n_val == 0:
            return self, None
        return PackedText(self.rows[:-n_val]), PackedText(self.rows[-n_val:])

    def __len__(self) -> int:
        return len(self.rows)

    def collate(self, indices: list[int]) -> dict:
        rows = self.rows[indices]
        return {"input": rows[:, :-1], "labels": rows[:, 1:], "n_targets": rows[:, 1:].numel()}


class TaskRows:
    """Packed text whose batches give a share of their rows to each of some synthetic tasks: rows that
    teach a skill the world's text rarely asks for. A task is a (share, make) pair, `make(gen, length)`
    giving one row's (input, labels); the rows come from a generator seeded by the batch's indices, so
    a resumed run sees the same ones."""

    def __init__(self, text: PackedText, tasks: list[tuple[float, Callable]]):
        self.text, self.tasks = text, tasks

    def __len__(self) -> int:
        return len(self.text)

    def collate(self, indices: list[int]) -> dict:
        batch = self.text.collate(indices)
        length = batch["input"].shape[1]
        gen = torch.Generator().manual_seed(zlib.crc32(torch.tensor(indices).numpy().tobytes()))
        inputs, labels = batch["input"].clone(), batch["labels"].clone()
        start = 0
        for share, make in self.tasks:
            n = round(len(indices) * share)
            for row in range(start, start + n):
                inputs[row], labels[row] = make(gen, length)
            start += n
        return {"input": inputs, "labels": labels, "n_targets": int((labels != -100).sum())}


MIN_SPAN = 12


def copy_rows(vocab_size: int) -> Callable:
    """Repeated spans (kosmo.data.copying): a span of 12 tokens up to half the row, written again and
    again to the row's end, with loss only on the repeats.

    Naming a picture from the examples before it in a prompt needs the induction circuit that
    predicting a repeat needs, and a small LM trained on this world's text alone does not form one
    in hundreds of steps, nor afterwards on repeated spans alone; trained on them from the start,
    beside the text, it forms one within a few hundred.
    """
    def make(gen: torch.Generator, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        spans, span = repeated_spans(1, (MIN_SPAN, max(MIN_SPAN, (length + 1) // 2)), vocab_size, gen, length + 1)
        labels = spans[0, 1:].clone()
        labels[:span] = -100  # the first span, and the first repeat of its first token, are unpredictable
        return spans[0, :-1], labels
    return make


def passkey_rows(tokenizer: Tokenizer, seq_len: int | None = None) -> Callable:
    """Passkey prompts as long as the row, each with its needle at a random depth (kosmo.data.passkey)."""
    prompts = PasskeyPrompts(tokenizer)
    shortest = prompts.minimum() + len(prompts.key_ids("00000"))
    if seq_len is not None and seq_len < shortest:
        raise KosmoError(f"passkey_rows need seq_len of at least {shortest} (a passkey prompt with no filler), "
                         f"got {seq_len}")
    return lambda gen, length: passkey_row(prompts, length, gen)


def _join(docs: list[list[int]]) -> list[int]:
    out: list[int] = []
    for d in docs:
        out += [BOS, *d, EOS]
    return out



def token_loss(model, batch: dict, loss_chunk: int = LOSS_CHUNK, **inputs) -> torch.Tensor:
    """Summed next-token cross-entropy in fp32 over the targets (labels of -100 are skipped).

    Logits are computed at the target positions only: in chat data most tokens are prompt, and the
    output layer over the whole vocabulary is the costliest matmul of a small model. The model
    fuses the head and the loss, `loss_chunk` targets at a time (`CausalLM.forward`'s labels).
    """
    at = batch["labels"] != -100
    return model(batch["input"], segments=batch.get("segments"), logits_at=at, labels=batch["labels"][at],
                 loss_chunk=loss_chunk, **inputs)


def lm_loss(model, batch) -> tuple[torch.Tensor, dict]:
    return token_loss(model, batch), {}


def _text_data(cfg: StageConfig, data: list[str], tokenizer: Tokenizer):
    """(train set, eval set): a TextStream over a shard folder, or packed rows in memory."""
    sources = [parse_source(d) for d in data]
    if not any(s.path.is_dir() for s in sources):
        return PackedText.from_texts(iter_texts(data), tokenizer, cfg.seq_len).split(cfg.val_fraction)
    if len(sources) > 1:
        raise KosmoError(f"{', '.join(map(str, data))}: a shard folder is streamed, and must be the only --data "
                         "(write the others into its shards with `kosmo shard`)")
    rank, world = D.rank_world()
    stream = TextStream(sources[0], tokenizer, cfg.seq_len, rank, world, cfg.train.seed)
    val = PackedText.from_texts(iter_texts([cfg.val_data]), tokenizer, cfg.seq_len) if cfg.val_data else None
    return stream, val


def build(cfg: StageConfig, data: list[str], tokenizer: Tokenizer, init_model: LM | None = None):
    """(model, loss, train set, eval set) for the trainer."""
    train_set, eval_set = _text_data(cfg, data, tokenizer)
    tasks = []
    if cfg.copy_rows:
        tasks.append((cfg.copy_rows, copy_rows(tokenizer.vocab_size)))
    if cfg.passkey_rows:
        tasks.append((cfg.passkey_rows, passkey_rows(tokenizer, cfg.seq_len)))
    if tasks and isinstance(train_set, TextStream):
        raise KosmoError("copy_rows and passkey_rows mix into in-memory data; a streamed shard folder takes neither")
    if tasks:
        train_set = TaskRows(train_set, tasks)
    if init_model is not None:
        model = with_context(init_model, cfg.model)
    else:
        model = LM(lm_config(cfg.model, tokenizer.vocab_size))
    if cfg.seq_len > model.context_length:
        raise KosmoError(f"seq_len={cfg.seq_len} exceeds the model's context of {model.context_length}")
    if cfg.freeze == "lora":
        if init_model is None:
            raise KosmoError("freeze=lora adapts a trained model: give it --init RUN")
        lora.adapt(model, cfg.lora)
    return model, lm_loss, train_set, eval_set
